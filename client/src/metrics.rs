//! Prometheus exposition for both binaries, through `prometheus-client`.
//!
//! The control service keeps its counters in prometheus-client's own types. The agent's
//! counters live in the data path (plain atomics the sans-IO core owns, which must not depend
//! on a metrics library), so the agent reads them at scrape time with a
//! [`Collector`](prometheus_client::collector::Collector) that writes them through
//! [`Families`]. Either way the text comes out of prometheus-client's encoder in the Prometheus
//! text format 0.0.4, the format both binaries have always served.

use std::fmt;

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// The `Content-Type` of [`render`]'s output.
pub use prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// A sample's labels, in order.
pub type Labels = Vec<(&'static str, String)>;

/// One label.
pub fn label(key: &'static str, value: impl ToString) -> Labels {
    vec![(key, value.to_string())]
}

/// The registry's metrics in the Prometheus text format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut out, registry)
        .expect("writing to a String cannot fail");
    out
}

/// Writes point-in-time metric families from inside a collector.
pub struct Families<'a>(pub DescriptorEncoder<'a>);

impl Families<'_> {
    /// A counter family; `name` is without `_total`, which the encoder appends.
    pub fn counter(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (Labels, u64)>,
    ) -> fmt::Result {
        let samples = samples.into_iter().map(|(l, v)| (l, ConstCounter::new(v)));
        self.family(name, help, MetricType::Counter, samples)
    }

    /// A gauge family.
    pub fn gauge(
        &mut self,
        name: &str,
        help: &str,
        samples: impl IntoIterator<Item = (Labels, i64)>,
    ) -> fmt::Result {
        let samples = samples.into_iter().map(|(l, v)| (l, ConstGauge::new(v)));
        self.family(name, help, MetricType::Gauge, samples)
    }

    fn family<M: EncodeMetric>(
        &mut self,
        name: &str,
        help: &str,
        kind: MetricType,
        samples: impl IntoIterator<Item = (Labels, M)>,
    ) -> fmt::Result {
        let mut family = self.0.encode_descriptor(name, help, None, kind)?;
        for (labels, metric) in samples {
            metric.encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// One unlabelled sample.
pub fn one<V>(value: V) -> [(Labels, V); 1] {
    [(Vec::new(), value)]
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::collector::Collector;

    #[derive(Debug)]
    struct Fixed;

    impl Collector for Fixed {
        fn encode(&self, encoder: DescriptorEncoder) -> fmt::Result {
            let mut f = Families(encoder);
            f.counter(
                "t_drops",
                "Dropped, by reason.",
                [(label("reason", "a\"b"), 3), (label("reason", "c"), 0)],
            )?;
            f.gauge("t_up", "Up.", one(1))
        }
    }

    #[test]
    fn families_encode_as_prometheus_text() {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Fixed));
        assert_eq!(
            render(&registry),
            "# HELP t_drops_total Dropped, by reason.\n\
             # TYPE t_drops_total counter\n\
             t_drops_total{reason=\"a\\\"b\"} 3\n\
             t_drops_total{reason=\"c\"} 0\n\
             # HELP t_up Up.\n\
             # TYPE t_up gauge\n\
             t_up 1\n"
        );
    }
}
