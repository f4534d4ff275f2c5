//! The `tern` command line: serve, reload, credentials, check-config, firewall, migrate-coturn,
//! usage.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use tern::config::{self, Config};

#[derive(Parser)]
#[command(
    name = "tern",
    version,
    about = "Self-hosted WebRTC connectivity: STUN/TURN, ICE credentials, signaling"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct ConfigArgs {
    /// TOML config file (see config/tern.example.toml). Without it, built-in defaults.
    #[arg(long, short = 'c', env = "TERN_CONFIG")]
    config: Option<PathBuf>,
    /// Override one key: `--set turn.realm=example.org` (repeatable; applied last).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    set: Vec<String>,
}

impl ConfigArgs {
    fn load(&self) -> anyhow::Result<Config> {
        Ok(self.source().load()?)
    }

    /// The layers as given now: the file, `TERN_*` variables and `--set` flags. The
    /// daemon keeps this to load the same way again on reload.
    fn source(&self) -> tern::lifecycle::ConfigSource {
        tern::lifecycle::ConfigSource {
            file: self.config.clone(),
            env: config::tern_env(),
            sets: self.set.clone(),
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    Serve {
        #[command(flatten)]
        cfg: ConfigArgs,
    },
    /// Mint a time-limited TURN REST API credential (username `expiry:user`).
    Credentials {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// File holding the shared secret (first secret line is used).
        #[arg(long)]
        secret_file: Option<PathBuf>,
        /// The shared secret itself (prefer --secret-file: command lines are visible to others).
        #[arg(long, env = "TERN_SECRET", hide_env_values = true)]
        secret: Option<String>,
        /// User id put after the expiry.
        #[arg(long, default_value = "")]
        user: String,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 86400)]
        ttl: u64,
        /// Print JSON (username, password, ttl, uris-less) instead of two lines.
        #[arg(long)]
        json: bool,
    },
    /// Ask the running daemon to reload its configuration, secrets and certificates
    /// (SIGHUP to the pid in daemon.pid_file). The daemon logs the outcome.
    Reload {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// The daemon's pid file (default: daemon.pid_file of the config).
        #[arg(long)]
        pid_file: Option<PathBuf>,
    },
    /// Validate the configuration and print the first problem, naming its key. With
    /// `[cluster]`, also try Redis (2 s timeout) and say whether it answered.
    CheckConfig {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// Do not try to reach Redis.
        #[arg(long)]
        offline: bool,
    },
    /// Cluster mode (`[cluster]`): inspect the cluster through its Redis.
    Cluster {
        #[command(subcommand)]
        what: ClusterCommand,
    },
    /// Print firewall rules opening exactly what the config listens on.
    #[command(group(clap::ArgGroup::new("backend").required(true).args(["ufw", "nftables", "firewalld"])))]
    Firewall {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// `ufw allow` commands.
        #[arg(long)]
        ufw: bool,
        /// An nftables ruleset (chain tern_input in table inet filter), for `nft -f`.
        #[arg(long)]
        nftables: bool,
        /// `firewall-cmd --permanent` commands.
        #[arg(long)]
        firewalld: bool,
    },
    /// Print relayed bytes per user from the usage store (usage.path), per hour or day (UTC).
    Usage {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// Only this user id (REST credentials: the part after the expiry).
        #[arg(long)]
        user: Option<String>,
        /// Start: Unix seconds, YYYY-MM-DD, YYYY-MM-DDTHH:MM:SSZ, today, -7d (default -31d).
        #[arg(long)]
        from: Option<String>,
        /// End, exclusive (default: now).
        #[arg(long)]
        to: Option<String>,
        /// hour or day.
        #[arg(long)]
        granularity: Option<String>,
        /// table, csv or json.
        #[arg(long)]
        format: Option<String>,
        /// Only the N users with the most bytes in the current period (or the one holding --to).
        #[arg(long)]
        top: Option<u32>,
    },
    /// Print a tern.toml equivalent to a coturn turnserver.conf; list what cannot be carried over.
    MigrateCoturn {
        /// coturn's config file, e.g. /etc/turnserver.conf.
        file: PathBuf,
        /// Write static-auth-secret values to this new file (mode 0600) and reference it,
        /// instead of putting them in the printed config.
        #[arg(long)]
        secret_file: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Print the live nodes and their load, read from Redis.
    Status {
        #[command(flatten)]
        cfg: ConfigArgs,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve { cfg } => {
            let source = cfg.source();
            let cfg = source.load()?;
            tern::logging::init(&cfg.log);
            tern::daemon::run(cfg, source)?;
            Ok(())
        }
        Command::Usage {
            cfg,
            user,
            from,
            to,
            granularity,
            format,
            top,
        } => {
            let args = tern::usage::cli::UsageArgs {
                user,
                from,
                to,
                granularity,
                format,
                top,
            };
            match tern::usage::cli::run(&cfg.load()?, &args) {
                Ok(out) => {
                    print!("{out}");
                    Ok(())
                }
                Err(e) => bail!("{e}"),
            }
        }
        Command::Reload { cfg, pid_file } => {
            // Check the config first, as the daemon will: a broken file is reported here
            // and the daemon is not disturbed.
            let pid_file = match (pid_file, cfg.load()) {
                (_, Err(e)) => {
                    eprintln!("config error: {e:#}\nnot reloading: the daemon would refuse it");
                    std::process::exit(2);
                }
                (Some(p), Ok(_)) => p,
                (None, Ok(c)) => c.daemon.pid_file,
            };
            match tern::lifecycle::signal_reload(&pid_file) {
                Ok(pid) => {
                    println!(
                        "reload requested (SIGHUP to tern pid {pid}); the daemon logs the outcome"
                    );
                    Ok(())
                }
                Err(e) => {
                    eprintln!("{e}");
                    std::process::exit(1);
                }
            }
        }
        Command::Credentials {
            cfg,
            secret_file,
            secret,
            user,
            ttl,
            json,
        } => {
            let secret = match (secret_file, secret) {
                (Some(path), _) => {
                    let text = std::fs::read_to_string(&path)
                        .with_context(|| format!("reading {}", path.display()))?;
                    let first = config::read_secret_lines(&text).next();
                    match first {
                        Some(s) => s,
                        None => bail!("{} holds no secret", path.display()),
                    }
                }
                (None, Some(s)) => s,
                (None, None) => {
                    let c = cfg.load()?;
                    match c.turn_secrets()?.into_iter().next() {
                        Some(s) => s,
                        None => bail!("no secret: pass --secret-file or configure turn.auth_secrets / turn.secret_file"),
                    }
                }
            };
            let sep = cfg
                .load()
                .map(|c| c.turn.username_separator)
                .unwrap_or_else(|_| ":".into());
            let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
            let c = tern::turn::auth::mint_rest_credential(&secret, &user, ttl, now, &sep);
            if json {
                println!(
                    "{}",
                    serde_json::json!({"username": c.username, "password": c.password, "ttl": ttl})
                );
            } else {
                println!("username: {}\npassword: {}", c.username, c.password);
            }
            Ok(())
        }
        Command::Firewall {
            cfg,
            ufw,
            nftables,
            firewalld: _,
        } => {
            let c = cfg.load()?;
            let backend = if ufw {
                tern::ops::firewall::Backend::Ufw
            } else if nftables {
                tern::ops::firewall::Backend::Nftables
            } else {
                tern::ops::firewall::Backend::Firewalld
            };
            let source = cfg.config.as_ref().map_or_else(
                || "the built-in defaults".to_string(),
                |p| p.display().to_string(),
            );
            print!("{}", tern::ops::firewall::render(&c, backend, &source));
            Ok(())
        }
        Command::MigrateCoturn { file, secret_file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let m = tern::ops::migrate::migrate(
                &text,
                &file.display().to_string(),
                secret_file.as_deref(),
            );
            if let (Some(path), false) = (&secret_file, m.secrets.is_empty()) {
                write_secret_file(path, &m.secrets)?;
            }
            print!("{}", m.toml);
            for d in &m.dropped {
                let at = if d.line == 0 {
                    String::new()
                } else {
                    format!("line {}: ", d.line)
                };
                eprintln!("not carried over: {at}{}: {}", d.option, d.reason);
            }
            let checked = toml::from_str::<Config>(&m.toml)
                .map_err(|e| e.message().to_string())
                .and_then(|c| c.validate().map_err(|e| e.to_string()));
            if let Err(e) = checked {
                eprintln!("the generated config does not validate: {e}");
                std::process::exit(2);
            }
            Ok(())
        }
        Command::Cluster {
            what: ClusterCommand::Status { cfg },
        } => {
            let c = cfg.load()?;
            if !c.cluster.enabled() {
                bail!("cluster mode is off: set cluster.redis_url");
            }
            match tern::cluster::status::live_nodes(&c.cluster, Duration::from_secs(3)) {
                Ok(reg) => {
                    print!("{}", tern::cluster::status::render(&reg));
                    Ok(())
                }
                Err(e) => {
                    eprintln!(
                        "cannot read the registry from {}: {e}",
                        tern::cluster::conn::redacted_url(&c.cluster.redis_url)
                    );
                    std::process::exit(1);
                }
            }
        }
        Command::CheckConfig { cfg, offline } => match cfg.load() {
            Ok(c) => {
                println!("config ok");
                if c.cluster.enabled() && !offline {
                    let url = tern::cluster::conn::redacted_url(&c.cluster.redis_url);
                    match tern::cluster::status::ping(&c.cluster, Duration::from_secs(2)) {
                        Ok(()) => println!("cluster: Redis at {url} answered PING"),
                        Err(e) => println!(
                            "cluster: Redis at {url} not reachable within 2 s: {e} (the daemon starts anyway and keeps retrying)"
                        ),
                    }
                }
                Ok(())
            }
            Err(e) => {
                eprintln!("config error: {e:#}");
                std::process::exit(2);
            }
        },
    }
}

/// Creates `path` with mode 0600 holding one secret a line; refuses to overwrite.
fn write_secret_file(path: &std::path::Path, secrets: &[String]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {} (it must not exist yet)", path.display()))?;
    let mut text = secrets.join("\n");
    text.push('\n');
    f.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
