//! The standard `grpc.health.v1` service answers every authenticated caller, for the whole
//! server ("") and for the Listener service by name.

use stillpoint_listener::testing::{Cluster, Spec};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

#[tokio::test]
async fn standard_health_serves_any_authenticated_caller() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path(), Spec::default()).await;
    // An agent's certificate may call nothing of the Listener but Health, and this.
    for identity in ["operator", "viewer", "hook", "srv-a"] {
        let mut client = HealthClient::new(cluster.channel(identity));
        for service in ["", "stillpoint.v1.Listener"] {
            let reply = client
                .check(HealthCheckRequest { service: service.into() })
                .await
                .unwrap_or_else(|s| panic!("{identity} checking {service:?}: {s}"))
                .into_inner();
            assert_eq!(reply.status, ServingStatus::Serving as i32, "{identity} {service:?}");
        }
        let unknown = client.check(HealthCheckRequest { service: "nope.v1.Nothing".into() }).await;
        assert_eq!(unknown.unwrap_err().code(), tonic::Code::NotFound);
    }
}
