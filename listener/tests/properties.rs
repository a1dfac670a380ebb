//! Property tests over what comes from outside: any text as a config, generated configs with
//! mistakes, and any sequence of replies, deadlines and operator requests fed to the coordinator.
//! None may panic, and the protocol's rules must hold after every event.

use proptest::prelude::*;
use stillpoint_listener::coordinator::{
    AbortOutcome, Command, CommitReply, Coordinator, CopyDone, Event, PrepareReply, Timeouts,
};
use stillpoint_listener::model::{BackupRecord, ServerStep, SnapshotRef, State};
use stillpoint_listener::Config;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn any_text_as_a_config_is_an_error_or_a_config_never_a_panic(text in "\\PC{0,400}") {
        if let Ok(config) = toml::from_str::<Config>(&text) {
            let _ = config.problems();
        }
    }

    #[test]
    fn every_mistake_in_a_generated_config_is_named(
        servers in proptest::collection::vec("[a-c]{1,2}", 0..5),
        members in proptest::collection::vec("[a-d]{1,2}", 0..5),
        lease_ms in 0u64..100_000,
    ) {
        let mut text = String::from("data_dir = \"/tmp/x\"\nlisten = \"127.0.0.1:1\"\n[tls]\nca = \"/x\"\ncert = \"/x\"\nkey = \"/x\"\n[copy]\nmode = \"report\"\n");
        text.push_str(&format!("[timeouts]\nlease_ms = {lease_ms}\n"));
        for s in &servers {
            text.push_str(&format!("[[server]]\nname = \"{s}\"\naddress = \"127.0.0.1:1\"\n"));
        }
        text.push_str(&format!("[[group]]\nname = \"g\"\nservers = {members:?}\n"));
        let config: Config = toml::from_str(&text).expect("generated config parses");
        let problems = config.problems().join("\n");
        let server_twice = servers.iter().enumerate().any(|(i, s)| servers[..i].contains(s));
        let member_twice = members.iter().enumerate().any(|(i, m)| members[..i].contains(m));
        prop_assert_eq!(problems.contains("server.name:") && problems.contains("is listed twice"), server_twice);
        prop_assert_eq!(problems.contains("a server is listed twice"), member_twice);
        for m in &members {
            let missing = !servers.contains(m);
            prop_assert_eq!(problems.contains(&format!("server {m:?} is not in the inventory")), missing, "{}", problems);
        }
        prop_assert_eq!(problems.contains("has no servers"), members.is_empty());
        prop_assert_eq!(problems.contains("timeouts.lease_ms"), !(2_000..=60_000).contains(&lease_ms));
    }

    #[test]
    fn the_coordinator_keeps_its_rules_under_any_sequence_of_events(
        steps in proptest::collection::vec((0i64..3_000, event()), 1..60)
    ) {
        let timeouts = Timeouts { lease_ms: 10_000, commit_cutoff_ms: 6_000, commit_timeout_ms: 10_000, copy_timeout_ms: 20_000, cleanup_timeout_ms: 5_000, inspect_timeout_ms: 5_000 };
        let servers = ["a", "b", "c"].map(String::from);
        let mut c = Coordinator::new(BackupRecord::new("b1", "g", &servers, "test", 0), timeouts);
        let mut now = 0;
        let mut commits_sent = std::collections::HashSet::new();
        c.handle(now, Event::Start);
        for (advance, event) in steps {
            now += advance;
            let before = c.record.state.clone();
            let commands = c.handle(now, event);
            // Judged after the event: the Prepared reply that froze the last server is the one
            // that sends the commits, and every server is then frozen or being committed.
            let all_frozen = c
                .record
                .servers
                .iter()
                .all(|s| matches!(s.step, ServerStep::Frozen | ServerStep::Committing));
            if before.is_terminal() {
                prop_assert_eq!(&c.record.state, &before, "a terminal state changed");
            }
            for command in &commands {
                if let Command::Commit { server, .. } = command {
                    prop_assert!(all_frozen, "commit sent while not every server was frozen");
                    prop_assert!(now < 6_000, "commit sent at {} past the cutoff", now);
                    prop_assert!(commits_sent.insert(server.clone()), "commit sent twice to {}", server);
                }
                if let Command::Copy { .. } = command {
                    prop_assert!(c.record.verdict.as_ref().is_some_and(|v| v.consistent), "copy of an inconsistent cut");
                }
            }
            if c.record.state == State::Succeeded {
                prop_assert!(c.record.servers.iter().all(|s| matches!(s.step, ServerStep::Cleaned | ServerStep::CleanupFailed)), "succeeded without every copy");
            }
        }
    }
}

fn server() -> impl Strategy<Value = String> {
    prop_oneof![Just("a"), Just("b"), Just("c"), Just("zz")].prop_map(String::from)
}

fn event() -> impl Strategy<Value = Event> {
    let snapshot = SnapshotRef {
        volume: "data".into(),
        provider: "mock-san".into(),
        locator: "/x".into(),
        size_bytes: 1,
    };
    prop_oneof![
        3 => (server(), any::<bool>()).prop_map(|(server, ok)| Event::Prepared {
            server,
            reply: Ok(PrepareReply { prepared: ok, reason: if ok { String::new() } else { "no".into() }, ..Default::default() }),
        }),
        1 => server().prop_map(|server| Event::Prepared { server, reply: Err("unreachable".into()) }),
        3 => (server(), any::<bool>()).prop_map(move |(server, ok)| Event::Committed {
            server,
            reply: Ok(CommitReply { committed: ok, snapshots: vec![snapshot.clone()], ..Default::default() }),
        }),
        2 => (server(), any::<bool>()).prop_map(|(server, ok)| Event::Copied { server, result: if ok { Ok(CopyDone::default()) } else { Err("disk full".into()) } }),
        2 => server().prop_map(|server| Event::CleanedUp { server, result: Ok(1) }),
        1 => server().prop_map(|server| Event::Aborted { server, result: Ok(AbortOutcome::default()) }),
        1 => Just(Event::AbortRequested { by: "operator:x".into(), reason: "test".into() }),
        1 => Just(Event::Restarted),
        3 => Just(Event::Tick),
    ]
}
