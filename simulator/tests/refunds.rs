//! Refunds over HTTP: the contract the gateway's provider client relies on (answers,
//! idempotency, refusals, the status endpoint, signed `refund.*` webhooks) and, under the
//! fault modes, that no refund key ever returns money twice.

use serde_json::{json, Value};
use simulator::{RefundStatus, SimConfig, Simulator};
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::mpsc;
use warp::Filter;

/// A simulator serving on an ephemeral port.
struct Sim {
    sim: Simulator,
    base: String,
    http: reqwest::Client,
}

async fn start(cfg: SimConfig) -> Sim {
    let sim = Simulator::new(cfg);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(warp::serve(sim.routes()).incoming(listener).run());
    Sim {
        sim,
        base,
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap(),
    }
}

/// A webhook as received: `webhook-id`, `webhook-timestamp`, `webhook-signature`, body.
type Received = (String, String, String, Vec<u8>);

/// A receiver on an ephemeral port: its URL and the webhooks it got (answered 204).
async fn receiver() -> (String, mpsc::UnboundedReceiver<Received>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let route = warp::post()
        .and(warp::header::<String>("webhook-id"))
        .and(warp::header::<String>("webhook-timestamp"))
        .and(warp::header::<String>("webhook-signature"))
        .and(warp::body::bytes())
        .map(
            move |id: String, ts: String, sig: String, body: bytes::Bytes| {
                let _ = tx.send((id, ts, sig, body.to_vec()));
                warp::http::StatusCode::NO_CONTENT
            },
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(warp::serve(route).incoming(listener).run());
    (url, rx)
}

/// Sends a request; `None` when the client gave up (timeout) or the connection failed.
async fn send(req: reqwest::RequestBuilder) -> Option<(u16, Value)> {
    let r = req.send().await.ok()?;
    let status = r.status().as_u16();
    let body = r.json().await.unwrap_or(Value::Null);
    Some((status, body))
}

impl Sim {
    async fn charge(&self, key: &str, amount: i64) -> (u16, Value) {
        send(
            self.http
                .post(format!("{}/v1/charges", self.base))
                .json(&json!({
                    "idempotency_key": key, "amount": amount, "currency": "EUR", "reference": key,
                })),
        )
        .await
        .unwrap()
    }

    fn refund_req(&self, body: &Value) -> reqwest::RequestBuilder {
        let key = body["idempotency_key"].as_str().unwrap_or_default();
        self.http
            .post(format!("{}/v1/refunds", self.base))
            .header("Idempotency-Key", key)
            .json(body)
    }

    async fn refund(&self, key: &str, charge_key: &str, amount: i64) -> (u16, Value) {
        send(self.refund_req(&refund_body(key, charge_key, amount, "EUR")))
            .await
            .unwrap()
    }

    async fn refund_status(&self, key: &str) -> (u16, Value) {
        send(self.http.get(format!("{}/v1/refunds/{key}", self.base)))
            .await
            .unwrap()
    }
}

fn refund_body(key: &str, charge_key: &str, amount: i64, currency: &str) -> Value {
    json!({
        "idempotency_key": key,
        "charge_key": charge_key,
        "amount": amount,
        "currency": currency,
        "reference": format!("pay_{charge_key}"),
        "refund": 1,
    })
}

#[tokio::test]
async fn a_refund_of_a_captured_charge_succeeds_once_per_key_however_often_it_is_sent() {
    let s = start(SimConfig::default()).await;
    let (st, b) = s.charge("c1", 1000).await;
    assert_eq!((st, b["status"].as_str()), (200, Some("succeeded")), "{b}");

    let (st, first) = s.refund("r1", "c1", 1000).await;
    assert_eq!(st, 200, "{first}");
    assert_eq!(first["status"], "succeeded");
    assert_eq!(first["amount"], 1000);
    assert_eq!(first["currency"], "EUR");
    let id = first["refund_id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("re_sim_"), "{id}");
    for _ in 0..3 {
        let (st, again) = s.refund("r1", "c1", 1000).await;
        assert_eq!(st, 200, "{again}");
        assert_eq!(
            again["refund_id"],
            id.as_str(),
            "the same refund, not another"
        );
    }
    // The charge is fully refunded: another key cannot take more.
    let (st, b) = s.refund("r2", "c1", 100).await;
    assert_eq!(
        (st, b["code"].as_str()),
        (422, Some("amount_exceeds_captured"))
    );

    let ledger = s.sim.ledger();
    let r1 = ledger
        .refunds
        .iter()
        .find(|r| r.idempotency_key == "r1")
        .unwrap();
    assert_eq!(r1.refunds_made, 1);
    assert_eq!(r1.requests, 4);
    assert_eq!(r1.status, RefundStatus::Succeeded);
    assert_eq!(
        (r1.charge_key.as_str(), r1.reference.as_str(), r1.refund),
        ("c1", "pay_c1", 1)
    );
    assert_eq!(
        ledger.charges[0].captures, 1,
        "refunds leave captures alone"
    );
    // The ledger's JSON, as other crates read it, carries the refunds.
    let served: simulator::Ledger = send(s.http.get(format!("{}/ledger", s.base)))
        .await
        .map(|(_, b)| serde_json::from_value(b).unwrap())
        .unwrap();
    assert_eq!(served.refunds.len(), 2);
}

#[tokio::test]
async fn partial_refunds_are_refused_past_the_captured_amount() {
    let s = start(SimConfig::default()).await;
    s.charge("c1", 1000).await;
    for k in ["p1", "p2", "p3"] {
        let (st, b) = s.refund(k, "c1", 300).await;
        assert_eq!(st, 200, "{k}: {b}");
    }
    let (st, b) = s.refund("p4", "c1", 200).await;
    assert_eq!(st, 422, "{b}");
    assert_eq!(b["status"], "failed");
    assert_eq!(b["code"], "amount_exceeds_captured");
    // The refusal is final under its key: a repeat and the status say so.
    let (st, again) = s.refund("p4", "c1", 200).await;
    assert_eq!(
        (st, again["code"].as_str()),
        (422, Some("amount_exceeds_captured"))
    );
    let (st, b) = s.refund_status("p4").await;
    assert_eq!((st, b["status"].as_str()), (200, Some("failed")));
    // What is left can still be refunded, to the last cent.
    let (st, b) = s.refund("p5", "c1", 100).await;
    assert_eq!(st, 200, "{b}");
    let (st, b) = s.refund("p6", "c1", 1).await;
    assert_eq!(
        (st, b["code"].as_str()),
        (422, Some("amount_exceeds_captured"))
    );

    let ledger = s.sim.ledger();
    let refunded: i64 = ledger
        .refunds
        .iter()
        .filter(|r| r.status == RefundStatus::Succeeded)
        .map(|r| r.amount)
        .sum();
    assert_eq!(refunded, 1000);
    assert!(ledger
        .refunds
        .iter()
        .all(|r| r.refunds_made == u32::from(r.status == RefundStatus::Succeeded)));
}

#[tokio::test]
async fn refunds_of_unknown_uncaptured_or_other_currency_charges_are_refused() {
    let s = start(SimConfig {
        webhook_delay_ms: 60_000,
        ..SimConfig::default()
    })
    .await;
    let (st, b) = s.refund("r-unknown", "nope", 500).await;
    assert_eq!(
        st, 422,
        "never 404, which is the status endpoint's not-found: {b}"
    );
    assert_eq!(b["code"], "charge_not_found");

    // Ends in 01: declined. Ends in 03: pending (its webhook a minute away).
    assert_eq!(s.charge("declined", 1001).await.0, 200);
    assert_eq!(s.charge("pending", 1003).await.0, 202);
    for charge in ["declined", "pending"] {
        let (st, b) = s.refund(&format!("r-{charge}"), charge, 500).await;
        assert_eq!(
            (st, b["code"].as_str()),
            (422, Some("charge_not_captured")),
            "{b}"
        );
    }

    s.charge("eur", 1000).await;
    let (st, b) = send(s.refund_req(&refund_body("r-usd", "eur", 500, "USD")))
        .await
        .unwrap();
    assert_eq!(
        (st, b["code"].as_str()),
        (422, Some("currency_mismatch")),
        "{b}"
    );

    let ledger = s.sim.ledger();
    assert_eq!(ledger.refunds.len(), 4);
    assert!(ledger
        .refunds
        .iter()
        .all(|r| r.status == RefundStatus::Failed && r.refunds_made == 0));
}

#[tokio::test]
async fn a_refund_key_reused_for_another_amount_or_charge_is_refused() {
    let s = start(SimConfig::default()).await;
    s.charge("c1", 1000).await;
    s.charge("c2", 1000).await;
    assert_eq!(s.refund("r1", "c1", 500).await.0, 200);

    let (st, b) = s.refund("r1", "c1", 400).await;
    assert_eq!((st, b["status"].as_str()), (422, Some("failed")));
    assert_eq!(b["code"], "idempotency_key_reused");
    let (st, b) = s.refund("r1", "c2", 500).await;
    assert_eq!(
        (st, b["code"].as_str()),
        (422, Some("idempotency_key_reused"))
    );

    // The refund under the key is untouched, and nothing else moved.
    let (st, b) = s.refund_status("r1").await;
    assert_eq!(
        (st, b["status"].as_str(), b["amount"].as_i64()),
        (200, Some("succeeded"), Some(500))
    );
    let ledger = s.sim.ledger();
    assert_eq!(ledger.refunds.len(), 1);
    assert_eq!(ledger.refunds[0].refunds_made, 1);

    // Malformed requests record nothing: a header disagreeing with the body, an unknown
    // field, a non-positive amount.
    let mismatched = s
        .http
        .post(format!("{}/v1/refunds", s.base))
        .header("Idempotency-Key", "other")
        .json(&refund_body("r2", "c1", 100, "EUR"));
    assert_eq!(send(mismatched).await.unwrap().0, 400);
    let mut extra = refund_body("r3", "c1", 100, "EUR");
    extra["reason"] = json!("x");
    assert_eq!(send(s.refund_req(&extra)).await.unwrap().0, 400);
    assert_eq!(s.refund("r4", "c1", 0).await.0, 400);
    assert_eq!(s.sim.ledger().refunds.len(), 1);
}

#[tokio::test]
async fn the_refund_status_is_404_until_a_refund_exists_then_200() {
    let s = start(SimConfig::default()).await;
    let (st, b) = s.refund_status("r1").await;
    assert_eq!(st, 404);
    assert_eq!(
        (b["status"].as_str(), b["code"].as_str()),
        (Some("error"), Some("not_found"))
    );

    s.charge("c1", 5000).await;
    // Ends in 02: 503 on the first attempt, before refunding: still no refund.
    let (st, b) = s.refund("r1", "c1", 502).await;
    assert_eq!(st, 503, "{b}");
    assert_eq!(s.refund_status("r1").await.0, 404);
    assert!(s.sim.ledger().refunds.is_empty());

    let (st, b) = s.refund("r1", "c1", 502).await;
    assert_eq!(st, 200, "{b}");
    let (st, b) = s.refund_status("r1").await;
    assert_eq!(st, 200);
    assert_eq!(b["status"], "succeeded");
    assert_eq!(b["amount"], 502);

    // Ends in 06: refunded, then the answer is lost; the status tells the truth.
    let (st, _) = s.refund("r2", "c1", 1006).await;
    assert_eq!(st, 500);
    let (st, b) = s.refund_status("r2").await;
    assert_eq!((st, b["status"].as_str()), (200, Some("succeeded")));
    assert_eq!(s.refund("r2", "c1", 1006).await.0, 200);
    let ledger = s.sim.ledger();
    assert!(ledger.refunds.iter().all(|r| r.refunds_made == 1));
    assert_eq!(ledger.faults, 2);
}

/// Waits for the next webhook, verifies its signature and returns its body.
async fn next_webhook(rx: &mut mpsc::UnboundedReceiver<Received>, secret: &str) -> Value {
    let (id, ts, sig, body) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a webhook within 10 s")
        .unwrap();
    let secret = payments::webhook::secret_bytes(secret).unwrap();
    payments::webhook::verify(
        &[secret],
        Some(&id),
        Some(&ts),
        Some(&sig),
        &body,
        simulator::now_secs(),
    )
    .expect("a valid signature");
    serde_json::from_slice(&body).unwrap()
}

#[tokio::test]
async fn a_pending_refund_is_settled_by_a_signed_webhook() {
    let (url, mut rx) = receiver().await;
    let cfg = SimConfig {
        webhook_url: Some(url),
        webhook_delay_ms: 20,
        ..SimConfig::default()
    };
    let secret = cfg.webhook_secret.clone();
    let s = start(cfg).await;

    // The charge itself goes pending (ends in 03) and is captured by its webhook.
    assert_eq!(s.charge("c1", 2003).await.0, 202);
    let hook = next_webhook(&mut rx, &secret).await;
    assert_eq!(hook["type"], "charge.succeeded");
    assert_eq!(hook["data"]["idempotency_key"], "c1");

    // Ends in 03: pending, then `refund.succeeded`.
    let (st, b) = s.refund("r1", "c1", 1003).await;
    assert_eq!((st, b["status"].as_str()), (202, Some("pending")), "{b}");
    let id = b["refund_id"].as_str().unwrap().to_owned();
    let hook = next_webhook(&mut rx, &secret).await;
    assert_eq!(hook["type"], "refund.succeeded");
    let d = &hook["data"];
    assert_eq!(d["refund_id"], id.as_str());
    assert_eq!(d["idempotency_key"], "r1");
    assert_eq!(d["charge_key"], "c1");
    assert_eq!(d["reference"], "pay_c1");
    assert_eq!(d["refund"], 1);
    assert_eq!(d["status"], "succeeded");
    assert_eq!(s.refund_status("r1").await.1["status"], "succeeded");
    assert_eq!(s.refund("r1", "c1", 1003).await.0, 200);

    // Ends in 04: pending, then `refund.failed`; its amount is free again.
    // 1001 is more than the 1000 left (refusals come before the magic ending in 01).
    let (st, _) = s.refund("r2", "c1", 1001).await;
    assert_eq!(st, 422);
    let (st, b) = s.refund("r3", "c1", 904).await;
    assert_eq!((st, b["status"].as_str()), (202, Some("pending")), "{b}");
    let hook = next_webhook(&mut rx, &secret).await;
    assert_eq!(hook["type"], "refund.failed");
    assert_eq!(hook["data"]["status"], "failed");
    assert_eq!(hook["data"]["code"], "refund_declined");
    let (st, b) = s.refund("r3", "c1", 904).await;
    assert_eq!((st, b["status"].as_str()), (422, Some("failed")));
    assert_eq!(s.refund("r4", "c1", 1000).await.0, 200);

    let ledger = s.sim.ledger();
    let made: HashMap<&str, u32> = ledger
        .refunds
        .iter()
        .map(|r| (r.idempotency_key.as_str(), r.refunds_made))
        .collect();
    assert_eq!(
        made,
        HashMap::from([("r1", 1), ("r2", 0), ("r3", 0), ("r4", 1)])
    );
    assert_eq!(ledger.webhooks_sent, 3);
}

/// Sends `body` until the answer is final (200 or 422), polling the status while the
/// refund is pending; answers the final status. Each round sends the request twice at
/// once, as a client racing its own retry would.
async fn refund_until_final(s: &Sim, fast: &reqwest::Client, body: &Value) -> String {
    let key = body["idempotency_key"].as_str().unwrap().to_owned();
    let post = || {
        fast.post(format!("{}/v1/refunds", s.base))
            .header("Idempotency-Key", &key)
            .json(body)
    };
    for _ in 0..200 {
        let (a, b) = tokio::join!(send(post()), send(post()));
        for answer in [a, b].into_iter().flatten() {
            match answer {
                (200, b) => return b["status"].as_str().unwrap().to_owned(),
                (422, b) => return b["code"].as_str().unwrap().to_owned(),
                (202, _) => loop {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    let (st, b) = s.refund_status(&key).await;
                    assert_eq!(st, 200);
                    if b["status"] != "pending" {
                        return b["status"].as_str().unwrap().to_owned();
                    }
                },
                (st, b) => assert!(st >= 500, "unexpected {st} {b}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("refund {key} never became final");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refunds_are_made_at_most_once_per_key_under_every_fault() {
    let (url, _rx) = receiver().await;
    let s = std::sync::Arc::new(
        start(SimConfig {
            error_rate: 0.2,
            timeout_rate: 0.15,
            lost_response_rate: 0.15,
            async_rate: 0.25,
            hang_ms: 400,
            webhook_url: Some(url),
            webhook_delay_ms: 30,
            duplicate_webhook_rate: 0.5,
            webhook_jitter_ms: 40,
            magic_amounts: false,
            seed: Some(7),
            ..SimConfig::default()
        })
        .await,
    );
    // Gives up well before a hang ends, as the gateway's client does.
    let fast = reqwest::Client::builder()
        .timeout(Duration::from_millis(150))
        .build()
        .unwrap();
    const CHARGES: usize = 30;

    // Capture every charge, retrying through the faults.
    for i in 0..CHARGES {
        let key = format!("c{i}");
        loop {
            let sent = send(fast.post(format!("{}/v1/charges", s.base)).json(&json!({
                "idempotency_key": key, "amount": 1000, "currency": "EUR",
            })))
            .await;
            if let Some((200 | 202, _)) = sent {
                break;
            }
        }
        while s
            .sim
            .ledger()
            .charges
            .iter()
            .any(|c| c.idempotency_key == key && c.captures == 0)
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    let faults_after_charges = s.sim.ledger().faults;

    // Per charge: two halves (both must end succeeded: faults only delay them) and one
    // more cent, raced against them, that must never be refunded on top of both.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..CHARGES {
        for (j, amount) in [(0, 500), (1, 500), (2, 1)] {
            let (s, fast) = (s.clone(), fast.clone());
            tasks.spawn(async move {
                let body = refund_body(&format!("r{i}-{j}"), &format!("c{i}"), amount, "EUR");
                (j, refund_until_final(&s, &fast, &body).await)
            });
        }
    }
    let mut extra_refunded = 0;
    while let Some(done) = tasks.join_next().await {
        let (j, status) = done.unwrap();
        match j {
            2 if status == "succeeded" => extra_refunded += 1,
            2 => assert_eq!(status, "amount_exceeds_captured"),
            _ => assert!(
                status == "succeeded" || status == "amount_exceeds_captured",
                "{status}"
            ),
        }
    }

    let ledger = s.sim.ledger();
    assert!(
        ledger.faults > faults_after_charges + 10,
        "refunds met the faults: {} then {}",
        faults_after_charges,
        ledger.faults
    );
    assert_eq!(ledger.refunds.len(), CHARGES * 3);
    let mut per_charge: HashMap<&str, i64> = HashMap::new();
    for r in &ledger.refunds {
        assert!(r.refunds_made <= 1, "{r:?}");
        assert_eq!(
            r.refunds_made,
            u32::from(r.status == RefundStatus::Succeeded),
            "{r:?}"
        );
        if r.status == RefundStatus::Succeeded {
            *per_charge.entry(r.charge_key.as_str()).or_default() += r.amount;
        }
    }
    assert!(per_charge.values().all(|&v| v <= 1000), "{per_charge:?}");
    // Refused cents are those that came after both halves; a cent let through means
    // a half was refused instead, and the total still stays within the charge.
    assert!(extra_refunded <= CHARGES);
}

/// The charge path shares its outcomes and settlement with refunds: its magic amounts
/// still answer as their table says.
#[tokio::test]
async fn charges_keep_their_magic_outcomes() {
    let (url, mut rx) = receiver().await;
    let cfg = SimConfig {
        webhook_url: Some(url),
        webhook_delay_ms: 20,
        hang_ms: 300,
        ..SimConfig::default()
    };
    let secret = cfg.webhook_secret.clone();
    let s = start(cfg).await;
    let (st, b) = s.charge("k01", 1001).await;
    assert_eq!(
        (st, b["status"].as_str(), b["code"].as_str()),
        (200, Some("declined"), Some("card_declined"))
    );
    assert_eq!(s.charge("k02", 1002).await.0, 503);
    assert_eq!(s.charge("k02", 1002).await.0, 200);
    assert_eq!(s.charge("k04", 1004).await.0, 202);
    let hook = next_webhook(&mut rx, &secret).await;
    assert_eq!(
        (hook["type"].as_str(), hook["data"]["code"].as_str()),
        (Some("charge.failed"), Some("insufficient_funds"))
    );
    let fast = reqwest::Client::builder()
        .timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let hung = send(fast.post(format!("{}/v1/charges", s.base)).json(&json!({
        "idempotency_key": "k05", "amount": 1005, "currency": "EUR",
    })))
    .await;
    assert!(
        hung.is_none(),
        "the first attempt hangs past the client's timeout"
    );
    assert_eq!(s.charge("k05", 1005).await.0, 200);
    assert_eq!(s.charge("k06", 1006).await.0, 500);
    assert_eq!(s.charge("k06", 1006).await.0, 200);
    for _ in 0..2 {
        assert_eq!(s.charge("k08", 1008).await.0, 503);
    }
    assert_eq!(s.charge("k10", 1010).await.0, 503);
    assert_eq!(s.charge("k10", 1010).await.0, 202);
    let hook = next_webhook(&mut rx, &secret).await;
    assert_eq!(
        (
            hook["type"].as_str(),
            hook["data"]["idempotency_key"].as_str()
        ),
        (Some("charge.succeeded"), Some("k10"))
    );
    let ledger = s.sim.ledger();
    assert!(ledger.charges.iter().all(|c| c.captures <= 1));
    let captured: Vec<&str> = ledger
        .charges
        .iter()
        .filter(|c| c.captures == 1)
        .map(|c| c.idempotency_key.as_str())
        .collect();
    assert_eq!(captured, ["k02", "k05", "k06", "k10"]);
    assert_eq!(ledger.faults, 6);
}
