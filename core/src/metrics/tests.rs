//! The endpoint over a real socket: what a Prometheus server gets, and what others get.

use prometheus_client::metrics::counter::Counter;

use super::*;
use crate::testing::{http_get, Exposition};

fn registry() -> Arc<Registry> {
    let mut registry = Registry::default();
    register_build_info(&mut registry, "9.9.9");
    let counter = Counter::<u64>::default();
    counter.inc_by(3);
    registry.register("stillpoint_things", "Things", counter);
    Arc::new(registry)
}

async fn get(endpoint: &Endpoint, path: &str) -> (u16, String) {
    let addr = endpoint.local_addr();
    let path = path.to_string();
    tokio::task::spawn_blocking(move || http_get(addr, &path)).await.unwrap().unwrap()
}

fn config(allow: Vec<IpAddr>) -> MetricsConfig {
    MetricsConfig { listen: "127.0.0.1:0".parse().unwrap(), allow }
}

#[tokio::test]
async fn serves_the_exposition_at_metrics_and_nothing_else() {
    let endpoint = serve(&config(Vec::new()), registry()).await.unwrap();
    let (status, body) = get(&endpoint, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.ends_with("# EOF\n"), "OpenMetrics ends with # EOF: {body}");
    let scraped = Exposition::parse(&body).unwrap();
    assert_eq!(scraped.get("stillpoint_things_total", &[]), Some(3.0), "{body}");
    assert_eq!(scraped.get("stillpoint_build_info", &[("version", "9.9.9")]), Some(1.0), "{body}");
    let (status, body) = get(&endpoint, "/").await;
    assert_eq!((status, body.as_str()), (404, "not found: metrics are at /metrics\n"));
}

#[tokio::test]
async fn a_peer_not_allowed_is_refused() {
    let elsewhere: IpAddr = "192.0.2.1".parse().unwrap();
    let endpoint = serve(&config(vec![elsewhere]), registry()).await.unwrap();
    let (status, body) = get(&endpoint, "/metrics").await;
    assert_eq!(status, 403, "{body}");
    assert!(!body.contains("stillpoint_things"), "{body}");
    let local: IpAddr = "127.0.0.1".parse().unwrap();
    let endpoint = serve(&config(vec![elsewhere, local]), registry()).await.unwrap();
    assert_eq!(get(&endpoint, "/metrics").await.0, 200);
}

#[tokio::test]
async fn dropping_the_endpoint_closes_it() {
    let endpoint = serve(&config(Vec::new()), registry()).await.unwrap();
    let addr = endpoint.local_addr();
    drop(endpoint);
    // The abort lands at the task's next poll; the socket closes with the task.
    let mut refused = false;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(refused, "{addr} still accepts connections");
}

#[tokio::test]
async fn an_address_in_use_fails_the_start() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let config = MetricsConfig { listen: taken.local_addr().unwrap(), allow: Vec::new() };
    let err = serve(&config, registry()).await.err().expect("the port is taken");
    assert!(err.to_string().contains("metrics.listen"), "{err}");
}

#[test]
fn certificate_expiry_is_its_not_after() {
    let dir = tempfile::tempdir().unwrap();
    let ca = crate::certs::create_ca(dir.path(), "test CA", 30).unwrap();
    let at = certificate_expiry(&ca).unwrap();
    let now = crate::unix_ms() / 1000;
    let days = (at - now) as f64 / 86_400.0;
    assert!((29.0..=31.0).contains(&days), "expires in {days} days, made for 30");
    let err = certificate_expiry(&dir.path().join("absent.pem")).unwrap_err();
    assert!(err.to_string().contains("absent.pem"), "{err}");
}

#[test]
fn the_metrics_port_cannot_be_the_services() {
    let service: SocketAddr = "0.0.0.0:7443".parse().unwrap();
    let same = MetricsConfig { listen: "127.0.0.1:7443".parse().unwrap(), allow: Vec::new() };
    assert_eq!(same.problems(Some(service)).len(), 1);
    let own = MetricsConfig { listen: "127.0.0.1:9464".parse().unwrap(), allow: Vec::new() };
    assert!(own.problems(Some(service)).is_empty());
}

#[test]
fn the_exposition_parser_reads_labels_and_escapes() {
    let text = "# TYPE x counter\nx_total{a=\"1\",b=\"q\\\"uote\"} 2\ny 1.5\nh_bucket{le=\"+Inf\"} 4\n# EOF\n";
    let parsed = Exposition::parse(text).unwrap();
    assert_eq!(parsed.get("x_total", &[("b", "q\"uote")]), Some(2.0));
    assert_eq!(parsed.get("y", &[]), Some(1.5));
    assert_eq!(parsed.get("h_bucket", &[("le", "+Inf")]), Some(4.0));
    assert!(Exposition::parse("garbage").is_err());
}
