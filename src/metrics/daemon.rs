//! The daemon's own metrics: version and lifecycle state ([`crate::lifecycle::STATE`]).

use super::collect::{Face, Families};
use crate::metrics_def::metric_table;

metric_table! { pub DEFS;
    BUILD_INFO: Gauge "tern_build_info" ["version"]
        "Always 1; the version label is the running Tern's.";
    READY: Gauge "tern_ready" []
        "1 while every listener serves and no drain is running (what /readyz answers 200 for).";
    DRAINING: Gauge "tern_draining" []
        "1 from the first SIGTERM until exit (new allocations and signaling refused).";
}

/// The daemon face's collector.
pub(super) fn collector() -> Face<()> {
    Face::new(DEFS.iter(), (), read)
}

fn read(_: &(), f: &mut Families) {
    let st = &crate::lifecycle::STATE;
    f.sample(&BUILD_INFO, &[env!("CARGO_PKG_VERSION")], 1);
    f.sample(&READY, &[], u64::from(st.ready()));
    f.sample(&DRAINING, &[], u64::from(st.draining()));
}
