//! What one exported metric is — its name (with the `tern_` prefix and base unit),
//! Prometheus type, label names and help text — and [`metric_table!`], which declares a
//! face's metrics as named constants and lists them in that face's one table.
//!
//! Imports nothing of the crate, so `api` (whose per-route request metrics register
//! themselves) and `metrics` (which builds the full list and the scrape-time collectors
//! from the faces' tables) both use it without importing each other.

/// Prometheus metric type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricType {
    Counter,
    Gauge,
    Histogram,
}

/// One metric Tern exports (docs/metrics.md describes each).
#[derive(Debug)]
pub struct Def {
    pub name: &'static str,
    pub help: &'static str,
    pub kind: MetricType,
    pub labels: &'static [&'static str],
}

/// Declares each metric of a face once, as a constant, and the table listing them all:
///
/// ```ignore
/// metric_table! { pub TABLE;
///     NAME: Counter "tern_thing_total" ["label"] "Help text.";
/// }
/// ```
macro_rules! metric_table {
    ($vis:vis $table:ident; $($name:ident: $kind:ident $metric:literal [$($label:literal),*] $help:literal;)*) => {
        $(
            $vis const $name: $crate::metrics_def::Def = $crate::metrics_def::Def {
                name: $metric,
                help: $help,
                kind: $crate::metrics_def::MetricType::$kind,
                labels: &[$($label),*],
            };
        )*
        /// Every metric of this face, in declaration order.
        $vis const $table: &[&$crate::metrics_def::Def] = &[$(&$name),*];
    };
}
pub(crate) use metric_table;
