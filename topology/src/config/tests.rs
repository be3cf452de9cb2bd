use super::*;

const SHIPPED: &str = include_str!("../../../config/topology.toml");

/// Compiles `text`, which must be refused with an error containing `expected`.
fn assert_refused(text: &str, expected: &str) {
    match compile_str(text) {
        Ok(_) => panic!("compiled, expected an error containing {expected:?}"),
        Err(errs) => {
            let errs = errs.to_string();
            assert!(errs.contains(expected), "{errs}");
        }
    }
}

#[test]
fn the_shipped_topology_compiles() {
    let t = compile_str(SHIPPED).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(t.source_topics(), vec!["payments.commands".to_string()]);
    let ids: Vec<_> = t.nodes.iter().map(|n| n.id.as_str()).collect();
    let pos = |id| ids.iter().position(|x| *x == id).unwrap();
    assert!(
        pos("commands") < pos("decode")
            && pos("decode") < pos("limits")
            && pos("limits") < pos("payments")
    );
    assert!(pos("payments") < pos("events"));
}

#[test]
fn every_error_is_reported_and_names_its_component() {
    let text = r#"
        application_id = "app"
        [stores.s]
        type = "key_value"
        [sources.in]
        topic = "t"
        [processors.a]
        type = "no_such_type"
        inputs = ["in"]
        [processors.b]
        type = "payment_state_machine"
        inputs = ["ghost"]
        stores = { state = "missing", dedup = "s" }
        [processors.c]
        type = "amount_limit"
        inputs = ["d"]
        params = { max_minor_units = 5 }
        [processors.d]
        type = "amount_limit"
        inputs = ["c"]
        params = { max_minor_units = 5 }
        [sinks.out]
        type = "kafka"
        inputs = ["b"]
        params = { topic = "o", records = "event", extra = 1 }
    "#;
    let errs = compile_str(text).unwrap_err().0;
    let text: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
    let has = |needle: &str| {
        assert!(
            text.iter().any(|t| t.contains(needle)),
            "missing {needle:?} in {text:#?}"
        )
    };
    has("processor `a`: unknown type `no_such_type`; known types: amount_limit, command_decoder, merchant_notifier, payment_state_machine, refund_state_machine");
    has("processor `b`: input `ghost` doesn't match any component");
    has("processor `b`: store `missing` (role `state`) is not declared");
    has("processor `b`: store `s` for role `dedup` must have type = \"dedup\"");
    has("sink `out`: invalid params");
    has("cycle");
    has("source `in`: its raw records have nowhere to go");
}

#[test]
fn invalid_params_are_reported() {
    let text = SHIPPED.replace("max_attempts = 4", "max_attempts = 0");
    assert_refused(
        &text,
        "processor `payments`: invalid params: max_attempts must be >= 1",
    );
}

#[test]
fn the_processing_guarantee_is_read_and_checked() {
    let eos = SHIPPED.replace("\"at_least_once\"", "\"exactly_once\"");
    assert_eq!(
        compile_str(&eos).unwrap().processing_guarantee,
        ProcessingGuarantee::ExactlyOnce
    );
    let bad = SHIPPED.replace("\"at_least_once\"", "\"at_most_once\"");
    assert_refused(&bad, "at_most_once");
}

#[test]
fn a_dead_letter_output_without_a_sink_is_an_error() {
    let text = SHIPPED.replace(
        "inputs = [\"decode\", \"payments\", \"refunds\"]\nparams = { topic = \"payments.dlq\", records = \"dead_letter\" }",
        "inputs = [\"payments\", \"refunds\"]\nparams = { topic = \"payments.dlq\", records = \"dead_letter\" }",
    );
    assert_ne!(text, SHIPPED);
    assert_refused(
        &text,
        "processor `decode`: its dead_letter records have nowhere to go",
    );
}

#[test]
fn syntax_errors_are_reported_with_position() {
    assert_refused("application_id = ", "topology.toml");
}

#[test]
fn a_kafka_sink_publishes_only_the_kind_it_names() {
    let t = compile_str(SHIPPED).unwrap();
    let dlq = t.nodes.iter().find(|n| n.id == "dead_letters").unwrap();
    assert_eq!(dlq.accepts, &[RecordKind::DeadLetter]);
    let events = t.nodes.iter().find(|n| n.id == "events").unwrap();
    assert_eq!(events.accepts, &[RecordKind::Event]);
    // A sink that names a kind its input never emits is an error.
    let bad = SHIPPED.replace("records = \"dead_letter\"", "records = \"event\"");
    assert_refused(&bad, "sink `dead_letters`: input `decode` emits command, dead_letter but this component accepts event");
}

#[test]
fn a_dedup_store_keeps_its_records_for_at_least_an_hour() {
    let text = SHIPPED.replace("retention_hours = 168", "retention_hours = 0");
    assert_refused(&text, "store `dedup`: `retention_hours` must be at least 1");
    let text = SHIPPED.replace("retention_hours = 168", "");
    assert_refused(
        &text,
        "store `dedup`: a dedup store needs `retention_hours`",
    );
}

/// The shipped topology with `state_retention` of the payments store set to `value`.
fn with_state_retention(value: &str) -> String {
    let text = SHIPPED.replace(
        "state_retention = \"8d\"",
        &format!("state_retention = {value}"),
    );
    assert_ne!(text, SHIPPED);
    text
}

#[test]
fn a_finished_payment_must_outlive_what_can_still_arrive_for_it() {
    // The commands topic keeps records for 7 days: a create could be redelivered after
    // its payment left the store.
    assert_refused(
        &with_state_retention("\"7d\""),
        "processor `payments`: store `payments` keeps a finished payment for 7d (state_retention), not longer than \
         source `commands` keeps its records (7d, retention)",
    );
    // Shorter topic retention, but the provider may still send webhooks for 3 days.
    let text = with_state_retention("\"2d\"").replace("retention = \"7d\"", "retention = \"1d\"");
    assert_refused(
        &text,
        "store `payments` keeps a finished payment for 2d (state_retention), not longer than the provider may \
         deliver a webhook (3d, webhook_max_delay_ms)",
    );
    // Both shortened, as the soak run does: the refunds' webhooks too.
    let text = with_state_retention("\"10m\"")
        .replace("retention = \"7d\"", "retention = \"5m\"")
        .replace(
            "backoff_max_ms = 10000 }",
            "backoff_max_ms = 10000, webhook_max_delay_ms = 120000 }",
        );
    assert_refused(
        &text,
        "processor `refunds`: store `payments` keeps a finished payment for 10m (state_retention), not longer than \
         the provider may deliver a refund's webhook (3d, webhook_max_delay_ms)",
    );
    let text = text.replace(
        "max_refunds_per_payment = 20 }",
        "max_refunds_per_payment = 20, webhook_max_delay_ms = 120000 }",
    );
    let t = compile_str(&text).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        t.stores["payments"].state_retention,
        Some(Span::from_ms(600_000))
    );
}

#[test]
fn retentions_are_durations_with_a_unit() {
    assert_refused(&with_state_retention("\"8\""), "`8` is not a duration");
    assert_refused(&with_state_retention("\"8w\""), "`8w` is not a duration");
    assert_refused(&with_state_retention("\"0d\""), "must be longer than zero");
    assert_refused(
        &with_state_retention("\"99999999999999999d\""),
        "too long a duration",
    );
    let dedup = SHIPPED.replace(
        "type = \"dedup\"\n",
        "type = \"dedup\"\nstate_retention = \"8d\"\n",
    );
    assert_ne!(dedup, SHIPPED);
    assert_refused(
        &dedup,
        "store `dedup`: `state_retention` is for key_value stores",
    );
}

#[test]
fn durations_print_in_their_largest_whole_unit() {
    for (text, ms, shown) in [
        ("90s", 90_000, "90s"),
        ("15m", 900_000, "15m"),
        ("48h", 172_800_000, "2d"),
    ] {
        let span = Span::try_from(text.to_owned()).expect("a duration");
        assert_eq!((span.as_ms(), span.to_string().as_str()), (ms, shown));
    }
}

/// The shipped topology without its refund processor: `payments` reads from `limits`
/// and no sink reads from `refunds`.
pub(super) fn without_refunds() -> String {
    let start = SHIPPED
        .find("# Refunds: decided")
        .expect("the shipped topology has a refund processor");
    let end = SHIPPED[start..]
        .find("[processors.payments]")
        .map(|e| start + e)
        .expect("payments follows refunds");
    let mut text = String::from(&SHIPPED[..start]);
    text.push_str(&SHIPPED[end..]);
    text.replace("inputs = [\"refunds\"]", "inputs = [\"limits\"]")
        .replace(", \"refunds\"]", "]")
}

#[test]
fn refunds_are_a_processor_in_the_chain_that_can_be_left_out() {
    let t = compile_str(SHIPPED).unwrap();
    assert!(t.has_processor_type("refund_state_machine"));
    // 8 days in the store after completion, less 3 days for a refund's late webhook.
    assert_eq!(t.refund_window(), Some(Span::days(5)));
    let text = without_refunds();
    assert!(
        !text.contains("\"refunds\"") && !text.contains("type = \"refund_state_machine\""),
        "{text}"
    );
    let t = compile_str(&text).unwrap_or_else(|e| panic!("{e}"));
    assert!(!t.has_processor_type("refund_state_machine"));
    assert_eq!(t.refund_window(), None);
    // Left in the file but out of the chain, its refund commands would have no input.
    let orphan = SHIPPED.replace("inputs = [\"refunds\"]", "inputs = [\"limits\"]");
    assert_refused(&orphan, "processor `refunds`");
}

/// The README's notification wiring: without the processor and the sink the topology
/// compiles and publishes no notifications; each miswiring is refused, naming it.
#[test]
fn notifications_are_switched_on_by_a_processor_and_a_sink_and_miswirings_are_refused() {
    let notify = "[processors.notify]\ntype = \"merchant_notifier\"\ninputs = [\"payments\", \"refunds\"]\nstores = { state = \"payments\" }\n";
    let sink = "[sinks.notifications]\ntype = \"kafka\"\ninputs = [\"notify\"]\nparams = { topic = \"payments.notifications\", records = \"notification\" }\n";
    assert!(SHIPPED.contains(notify) && SHIPPED.contains(sink));
    let without = SHIPPED.replace(notify, "").replace(sink, "");
    let t = compile_str(&without).unwrap_or_else(|e| panic!("{e}"));
    assert!(!t.has_processor_type("merchant_notifier"));
    assert_eq!(t.notifications_topic(), None);
    assert!(compile_str(SHIPPED)
        .unwrap()
        .notifications_topic()
        .is_some());

    let misread = SHIPPED.replace(sink, &sink.replace("[\"notify\"]", "[\"payments\"]"));
    let errs = compile_str(&misread)
        .expect_err("a sink of notifications reading events")
        .to_string();
    assert!(
        errs.starts_with("topology is invalid (2 errors):"),
        "{errs}"
    );
    assert!(errs.contains("sink `notifications`: input `payments` emits event, provider_call, dead_letter but this component accepts notification"), "{errs}");
    assert!(
        errs.contains("processor `notify`: its notification records have nowhere to go"),
        "{errs}"
    );

    let storeless = SHIPPED.replace(
        notify,
        &notify.replace("stores = { state = \"payments\" }\n", ""),
    );
    let errs = compile_str(&storeless)
        .expect_err("a notifier without its store")
        .to_string();
    assert!(errs.starts_with("topology is invalid (1 error):"), "{errs}");
    assert!(
        errs.contains("processor `notify`: needs store role `state`"),
        "{errs}"
    );

    assert_refused(
        &SHIPPED.replace(sink, ""),
        "processor `notify`: its notification records have nowhere to go",
    );
}
