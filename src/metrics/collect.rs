//! Builds metric families from plain counter snapshots at scrape time, and [`Face`], the
//! one `prometheus` collector every face's metrics file instantiates.

use prometheus::core::{Collector, Desc};
use prometheus::proto::{Bucket, Counter, Gauge, Histogram, LabelPair, Metric, MetricFamily};

use crate::metrics_def::{Def, MetricType};
use crate::turn::stats::Histo;

/// A face's scrape-time collector: the descriptors of its tables and a function that reads
/// its counters (`src`) into families.
pub(super) struct Face<S> {
    descs: Vec<Desc>,
    src: S,
    read: fn(&S, &mut Families),
}

impl<S> Face<S> {
    pub(super) fn new<'a>(
        defs: impl Iterator<Item = &'a &'static Def>,
        src: S,
        read: fn(&S, &mut Families),
    ) -> Face<S> {
        let descs = defs
            .map(|d| {
                Desc::new(
                    d.name.to_string(),
                    d.help.to_string(),
                    d.labels.iter().map(|l| l.to_string()).collect(),
                    Default::default(),
                )
                .expect("valid metric definition")
            })
            .collect();
        Face { descs, src, read }
    }
}

impl<S: Send + Sync> Collector for Face<S> {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut f = Families::default();
        (self.read)(&self.src, &mut f);
        f.fams
    }
}

/// The families of one collector's scrape, in definition order.
#[derive(Default)]
pub(super) struct Families {
    fams: Vec<MetricFamily>,
}

fn labels(d: &Def, values: &[&str]) -> Vec<LabelPair> {
    debug_assert_eq!(d.labels.len(), values.len(), "{}", d.name);
    d.labels
        .iter()
        .zip(values)
        .map(|(n, v)| {
            let mut l = LabelPair::default();
            l.set_name(n.to_string());
            l.set_value(v.to_string());
            l
        })
        .collect()
}

impl Families {
    fn family(&mut self, d: &Def) -> &mut MetricFamily {
        let i = match self.fams.iter().position(|f| f.name() == d.name) {
            Some(i) => i,
            None => {
                let mut f = MetricFamily::default();
                f.set_name(d.name.to_string());
                f.set_help(d.help.to_string());
                f.set_field_type(match d.kind {
                    MetricType::Counter => prometheus::proto::MetricType::COUNTER,
                    MetricType::Gauge => prometheus::proto::MetricType::GAUGE,
                    MetricType::Histogram => prometheus::proto::MetricType::HISTOGRAM,
                });
                self.fams.push(f);
                self.fams.len() - 1
            }
        };
        &mut self.fams[i]
    }

    /// One counter or gauge sample with these label values (in `d.labels` order).
    pub(super) fn sample(&mut self, d: &Def, values: &[&str], v: u64) {
        let mut m = Metric::from_label(labels(d, values));
        match d.kind {
            MetricType::Counter => {
                let mut c = Counter::default();
                c.set_value(v as f64);
                m.set_counter(c);
            }
            MetricType::Gauge => {
                let mut g = Gauge::default();
                g.set_value(v as f64);
                m.set_gauge(g);
            }
            MetricType::Histogram => return,
        }
        self.family(d).mut_metric().push(m);
    }

    /// One histogram from per-bucket counts.
    pub(super) fn histogram<const N: usize>(
        &mut self,
        d: &Def,
        values: &[&str],
        bounds: &[f64; N],
        h: &Histo<N>,
    ) {
        let mut hist = Histogram::default();
        hist.set_sample_count(h.count);
        hist.set_sample_sum(h.sum);
        let buckets = bounds
            .iter()
            .zip(h.cumulative())
            .map(|(&b, c)| {
                let mut bk = Bucket::default();
                bk.set_upper_bound(b);
                bk.set_cumulative_count(c);
                bk
            })
            .collect();
        hist.set_bucket(buckets);
        let mut m = Metric::from_label(labels(d, values));
        m.set_histogram(hist);
        self.family(d).mut_metric().push(m);
    }
}
