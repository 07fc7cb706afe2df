//! kube-rs's own pod watcher against the fake API server in support/apiserver.rs, as the agent's
//! pod source will run it: this node's pods only, changes as watch events, resumption after the
//! server ends a watch. Unprivileged; everything runs on loopback.
mod support;

use std::{net::TcpListener, pin::Pin, time::Duration};

use futures::{Stream, StreamExt as _};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::{
    api::ListParams,
    runtime::watcher::{self, watcher, Event},
    Api, Client, ResourceExt,
};
use support::apiserver::{pod, ApiServer};

/// Every wait is bounded, so a broken fixture fails the test instead of hanging it.
const WAIT: Duration = Duration::from_secs(10);
const NODE_A: &str = "spec.nodeName=node-a";
/// The parameters of the watcher's first list: the selector above, kube's default page size.
const FIRST_LIST: [&str; 2] = ["fieldSelector=spec.nodeName%3Dnode-a", "limit=500"];

type Events = Pin<Box<dyn Stream<Item = watcher::Result<Event<Pod>>> + Send>>;

fn start() -> ApiServer {
    ApiServer::serve(TcpListener::bind("127.0.0.1:0").unwrap())
}

fn client(server: &ApiServer) -> Client {
    Client::try_from(kube::Config::new(server.url().parse().unwrap())).unwrap()
}

fn watch(server: &ApiServer, config: watcher::Config) -> Events {
    watcher(Api::<Pod>::all(client(server)), config).boxed()
}

async fn next_result(events: &mut Events) -> watcher::Result<Event<Pod>> {
    tokio::time::timeout(WAIT, events.next())
        .await
        .unwrap_or_else(|_| panic!("no watcher event within {WAIT:?}"))
        .expect("the watcher stream never ends")
}

async fn next(events: &mut Events) -> Event<Pod> {
    next_result(events)
        .await
        .unwrap_or_else(|err| panic!("watcher error: {err}"))
}

/// Waits for `cond` without blocking the runtime: kube's connections live on it.
async fn until(what: &str, cond: impl Fn() -> bool) {
    let poll = async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(WAIT, poll)
        .await
        .unwrap_or_else(|_| panic!("not true after {WAIT:?}: {what}"));
}

/// An event as "Kind namespace/name", to compare whole sequences at a glance.
fn describe(event: &Event<Pod>) -> String {
    let key = |pod: &Pod| format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any());
    match event {
        Event::Init => "Init".to_owned(),
        Event::InitApply(pod) => format!("InitApply {}", key(pod)),
        Event::InitDone => "InitDone".to_owned(),
        Event::Apply(pod) => format!("Apply {}", key(pod)),
        Event::Delete(pod) => format!("Delete {}", key(pod)),
    }
}

/// The next event, which must be `expected` (see `describe`); returns its pod.
async fn expect(events: &mut Events, expected: &str) -> Pod {
    let event = next(events).await;
    assert_eq!(describe(&event), expected);
    match event {
        Event::InitApply(pod) | Event::Apply(pod) | Event::Delete(pod) => pod,
        Event::Init | Event::InitDone => panic!("{expected} carries no pod"),
    }
}

/// Consumes the initial list (Init, InitApply..., InitDone); returns its pods.
async fn initial_list(events: &mut Events) -> Vec<Pod> {
    assert_eq!(describe(&next(events).await), "Init");
    let mut pods = Vec::new();
    loop {
        match next(events).await {
            Event::InitApply(pod) => pods.push(pod),
            Event::InitDone => return pods,
            other => panic!("{} during the initial list", describe(&other)),
        }
    }
}

fn annotation<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.annotations().get(key).map(String::as_str)
}

fn pod_ips(pod: &Pod) -> Vec<&str> {
    let status = pod.status.as_ref().expect("a running pod has a status");
    let ips = status.pod_ips.as_deref().unwrap_or_default();
    ips.iter().map(|ip| ip.ip.as_str()).collect()
}

fn resource_version(pod: &Pod) -> String {
    pod.resource_version()
        .expect("the server sets resourceVersion")
}

/// A request's path and query parameters, in order. kube 5's queries start with an empty
/// parameter ("/api/v1/pods?&..."), which this skips.
fn parts(request: &str) -> (&str, Vec<&str>) {
    let (path, query) = request.split_once('?').unwrap_or((request, ""));
    (path, query.split('&').filter(|p| !p.is_empty()).collect())
}

fn watch_requests(server: &ApiServer) -> Vec<String> {
    let requests = server.requests();
    requests
        .into_iter()
        .filter(|r| r.contains("watch=true"))
        .collect()
}

#[tokio::test]
async fn initial_list_holds_only_this_nodes_pods() {
    let server = start();
    let egress = ("quicklane.io/egress-bandwidth", "10M");
    server.put_pod(pod(
        "team-a",
        "web",
        "node-a",
        &["10.1.0.5", "fd00:1::5"],
        &[egress],
    ));
    server.put_pod(pod("team-b", "db", "node-b", &["10.2.0.7"], &[]));
    server.put_pod(pod("team-b", "cache", "node-a", &["10.1.0.9"], &[]));

    let mut events = watch(&server, watcher::Config::default().fields(NODE_A));
    let pods = initial_list(&mut events).await;

    let mut names: Vec<String> = pods.iter().map(ResourceExt::name_any).collect();
    names.sort();
    assert_eq!(names, ["cache", "web"]);
    let web = pods.iter().find(|p| p.name_any() == "web").unwrap();
    assert_eq!(annotation(web, egress.0), Some(egress.1));
    assert_eq!(pod_ips(web), ["10.1.0.5", "fd00:1::5"]);
    assert!(web.uid().is_some_and(|uid| !uid.is_empty()));
    let requests = server.requests();
    assert_eq!(requests.len(), 1, "{requests:#?}");
    assert_eq!(parts(&requests[0]), ("/api/v1/pods", FIRST_LIST.to_vec()));
}

#[tokio::test]
async fn changes_arrive_as_watch_events() {
    let server = start();
    server.put_pod(pod("team-a", "web", "node-a", &["10.1.0.5"], &[]));
    let mut events = watch(&server, watcher::Config::default().fields(NODE_A));
    initial_list(&mut events).await;

    server.put_pod(pod("team-a", "api", "node-a", &["10.1.0.6"], &[]));
    expect(&mut events, "Apply team-a/api").await;
    // Off this node: the next event must be the annotation change, not this pod.
    server.put_pod(pod("team-b", "db", "node-b", &["10.2.0.7"], &[]));
    let egress = ("quicklane.io/egress-bandwidth", "20M");
    server.put_pod(pod("team-a", "web", "node-a", &["10.1.0.5"], &[egress]));
    let web = expect(&mut events, "Apply team-a/web").await;
    assert_eq!(annotation(&web, egress.0), Some(egress.1));
    server.delete_pod("team-a", "api");
    expect(&mut events, "Delete team-a/api").await;
    assert_eq!(server.watchers(), 1);
    drop(events);
    until("the server sees kube drop its watch", || {
        server.watchers() == 0
    })
    .await;

    let requests = server.requests();
    assert!(requests.len() >= 2, "a list, then a watch: {requests:#?}");
    for request in &requests {
        assert!(
            request.contains("fieldSelector=spec.nodeName%3Dnode-a"),
            "{request}"
        );
    }
}

#[tokio::test]
async fn watch_resumes_where_it_ended() {
    let server = start();
    server.put_pod(pod("team-a", "web", "node-a", &["10.1.0.5"], &[]));
    let mut events = watch(&server, watcher::Config::default().fields(NODE_A));
    initial_list(&mut events).await;
    server.put_pod(pod("team-a", "api", "node-a", &["10.1.0.6"], &[]));
    let api = expect(&mut events, "Apply team-a/api").await;
    assert_eq!(server.watchers(), 1);

    server.close_watches();
    assert_eq!(server.watchers(), 0);
    // Put while no watch is open: only resumption from api's version can deliver it.
    server.put_pod(pod("team-a", "batch", "node-a", &["10.1.0.7"], &[]));
    expect(&mut events, "Apply team-a/batch").await;
    // The very next event is a new one: nothing replayed, no re-list (which would start Init).
    server.put_pod(pod("team-a", "cron", "node-a", &["10.1.0.8"], &[]));
    expect(&mut events, "Apply team-a/cron").await;

    let requests = server.requests();
    assert_eq!(parts(&requests[0]), ("/api/v1/pods", FIRST_LIST.to_vec()));
    let watches = watch_requests(&server);
    assert_eq!(
        requests.len(),
        1 + watches.len(),
        "one list only: {requests:#?}"
    );
    assert_eq!(watches.len(), 2, "{watches:#?}");
    let resumed = format!("&resourceVersion={}", resource_version(&api));
    assert!(watches[1].ends_with(&resumed), "{watches:#?}");
}

#[tokio::test]
async fn server_side_watch_timeout_is_resumed() {
    let server = start();
    let mut events = watch(
        &server,
        watcher::Config::default().fields(NODE_A).timeout(1),
    );
    initial_list(&mut events).await;
    server.put_pod(pod("team-a", "api", "node-a", &["10.1.0.6"], &[]));
    expect(&mut events, "Apply team-a/api").await;

    until("the server ends the watch after timeoutSeconds=1", || {
        server.watchers() == 0
    })
    .await;
    server.put_pod(pod("team-a", "batch", "node-a", &["10.1.0.7"], &[]));
    expect(&mut events, "Apply team-a/batch").await;

    let watches = watch_requests(&server);
    assert_eq!(watches.len(), 2, "{watches:#?}");
    assert!(
        watches.iter().all(|w| w.contains("timeoutSeconds=1")),
        "{watches:#?}"
    );
}

#[tokio::test]
async fn paged_list_is_one_snapshot() {
    let server = start();
    for name in ["a1", "a2", "a3"] {
        server.put_pod(pod("team-a", name, "node-a", &["10.1.0.5"], &[]));
    }
    server.put_pod(pod("team-a", "b1", "node-b", &["10.2.0.5"], &[]));
    let mut events = watch(
        &server,
        watcher::Config::default().fields(NODE_A).page_size(1),
    );
    assert_eq!(describe(&next(&mut events).await), "Init");
    expect(&mut events, "InitApply team-a/a1").await;

    // Between pages: later pages still show the list's moment, the watch catches up after.
    server.put_pod(pod("team-a", "late", "node-a", &["10.1.0.9"], &[]));
    server.delete_pod("team-a", "a3");
    expect(&mut events, "InitApply team-a/a2").await;
    expect(&mut events, "InitApply team-a/a3").await;
    assert_eq!(describe(&next(&mut events).await), "InitDone");
    expect(&mut events, "Apply team-a/late").await;
    expect(&mut events, "Delete team-a/a3").await;

    let lists: Vec<String> = server
        .requests()
        .into_iter()
        .filter(|r| !r.contains("watch=true"))
        .collect();
    assert_eq!(lists.len(), 3, "{lists:#?}");
    assert!(lists.iter().all(|l| l.contains("limit=1")), "{lists:#?}");
    assert!(
        lists[1..].iter().all(|l| l.contains("continue=")),
        "{lists:#?}"
    );
}

#[tokio::test]
async fn unsupported_requests_fail_with_a_status() {
    let server = start();
    let mut events = watch(
        &server,
        watcher::Config::default().fields("metadata.name=web"),
    );
    assert_eq!(describe(&next(&mut events).await), "Init");
    match next_result(&mut events).await {
        Err(watcher::Error::InitialListFailed(kube::Error::Api(status))) => {
            assert_eq!(status.code, 400, "{status:?}");
        }
        other => panic!("a field selector the server lacks must fail the list: {other:?}"),
    }

    let configmaps = Api::<ConfigMap>::all(client(&server));
    match configmaps.list(&ListParams::default()).await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 404, "{status:?}"),
        other => panic!("only pods are served: {other:?}"),
    }
}

#[tokio::test]
async fn namespaced_list_holds_only_its_namespace() {
    let server = start();
    server.put_pod(pod("team-a", "web", "node-a", &["10.1.0.5"], &[]));
    server.put_pod(pod("team-b", "db", "node-a", &["10.1.0.6"], &[]));
    let pods = Api::<Pod>::namespaced(client(&server), "team-b");
    let list = pods.list(&ListParams::default()).await.unwrap();
    let names: Vec<String> = list.items.iter().map(ResourceExt::name_any).collect();
    assert_eq!(names, ["db"]);
}
