//! Reading Prometheus metrics from a service's `/metrics` (text exposition format): fetch the
//! page once, then sum the series of any metric in it.

/// The `/metrics` page of the service at `addr` (`host:port`), whatever its status, or `None`
/// if it did not answer.
pub async fn scrape(http: &reqwest::Client, addr: &str) -> Option<String> {
    crate::http::get(http, addr, "/metrics")
        .await
        .map(|(_, body)| body)
}

/// Sum of every series (all label sets) of metric `name` in a `/metrics` page: counters and
/// gauges; for a histogram or summary pass `<name>_sum` or `<name>_count`. Only the exact name
/// counts (`a_total` does not match `a_total_x`); 0 when absent.
pub fn sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, |a, b| a + b)
}

#[cfg(test)]
mod tests {
    use super::sum;

    #[test]
    fn sums_every_label_set_of_the_exact_name_only() {
        let page = "# HELP a_total x\n# TYPE a_total counter\na_total{p=\"0\"} 2\na_total{p=\"1\"} 3.5\na_total_x 100\na 7\nb_total 1\n";
        assert_eq!(sum(page, "a_total"), 5.5);
        assert_eq!(sum(page, "a"), 7.0);
        assert_eq!(sum(page, "missing"), 0.0);
    }
}
