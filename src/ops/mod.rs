//! Operations support: the systemd notification protocol (`sd_notify`) with a watchdog fed
//! by a self-probe, the process's memory (`memory`: the binary mapped in at start, freed heap
//! returned every minute), `tern firewall`
//! rule generation and `tern migrate-coturn`.
//!
//! Owns process supervision glue and deploy-time helpers. It must not hold protocol state
//! or sit on the data path: the daemon calls it from its main loop only, and the firewall
//! and migration code only read configs and print text.

mod cidr;
mod coturn_options;
pub mod firewall;
pub mod memory;
pub mod migrate;
pub mod notify;
pub mod probe;
pub mod supervisor;
