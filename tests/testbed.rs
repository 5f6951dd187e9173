//! The testbed's guards against the real kernel: namespaces are deleted (also when a test
//! panics), netlink handles work inside a namespace without moving the caller.

use std::path::Path;

use futures::TryStreamExt;
use tenet::testbed::Netns;

fn exists(ns: &str) -> bool {
    Path::new("/var/run/netns").join(ns).exists()
}

#[test]
fn namespace_is_deleted_on_drop_and_on_panic() {
    let ns = Netns::create("guard").unwrap();
    let name = ns.name().to_string();
    assert!(exists(&name));
    // A process left running inside must not keep it alive.
    let mut sleeper = ns.command("sleep").arg("300").spawn().unwrap();
    // `ip netns exec` execs the program, so wait until it is inside the namespace.
    while ns
        .run(&["ip", "netns", "identify", &sleeper.id().to_string()])
        .map_or(true, |o| o.trim().is_empty())
    {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    drop(ns);
    assert!(!exists(&name), "deleted on drop");
    let status = sleeper.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(9), "the process inside was killed");

    let name = std::panic::catch_unwind(|| {
        let ns = Netns::create("panic").unwrap();
        std::panic::panic_any(ns.name().to_string());
    })
    .unwrap_err()
    .downcast::<String>()
    .unwrap();
    assert!(!exists(&name), "deleted while unwinding");
}

#[tokio::test]
async fn netlink_inside_a_namespace_leaves_the_caller_where_it_was() {
    let ns = Netns::create("nl").unwrap();
    let before = std::fs::read_link("/proc/thread-self/ns/net").unwrap();
    let netlink = ns.netlink().unwrap();
    let handle = netlink.handle();
    handle
        .link()
        .add(rtnetlink::LinkBridge::new("tbr0").build())
        .execute()
        .await
        .unwrap();
    assert_eq!(
        std::fs::read_link("/proc/thread-self/ns/net").unwrap(),
        before
    );
    // The bridge exists inside the namespace and not outside it.
    let inside = ns.run(&["ip", "-o", "link", "show", "tbr0"]).unwrap();
    assert!(inside.contains("tbr0"));
    let (conn, root, _) = rtnetlink::new_connection().unwrap();
    tokio::spawn(conn);
    let found = root
        .link()
        .get()
        .match_name("tbr0".to_string())
        .execute()
        .try_next()
        .await;
    assert!(
        found.is_err(),
        "tbr0 must not exist in the caller's namespace"
    );
    // Commands run inside the namespace, with their errors reported.
    let err = ns.run(&["ip", "link", "show", "nope0"]).unwrap_err();
    assert!(err.to_string().contains("nope0"), "{err}");
}
