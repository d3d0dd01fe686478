//! `tollgate doctor`: is everything a paying client needs in place? Each upstream
//! reachable, the ledger read/write, each facilitator listing the configured networks,
//! what an unpaid client of each route will be told, and for each metered route the
//! hold a typical request takes; warnings for token prices no route can use and for
//! metered routes whose likely models have no price.

use std::process::ExitCode;
use std::time::Duration;

use crate::config::{Config, MeterPlan, Pricing, RouteConfig};
use crate::meter::{self, Ask, Meter, ModelPrice};

/// Checks what a paying client depends on. Exit code 1 when anything fails.
pub(crate) async fn doctor(cfg: Config) -> ExitCode {
    let mut failures = 0;
    println!("config: ok");
    for u in &cfg.upstreams {
        let uri = u.url.uri();
        let host = uri.host().unwrap_or("").trim_start_matches('[').trim_end_matches(']').to_owned();
        let port = uri.port_u16().unwrap_or(if uri.scheme_str() == Some("https") { 443 } else { 80 });
        let timeout = u.connect_timeout;
        match tokio::time::timeout(timeout, tokio::net::TcpStream::connect((host.as_str(), port))).await {
            Ok(Ok(_)) => println!("upstream {}: reachable at {host}:{port}", u.name),
            Ok(Err(e)) => {
                failures += 1;
                println!("upstream {}: UNREACHABLE at {host}:{port}: {e}", u.name);
            }
            Err(_) => {
                failures += 1;
                println!("upstream {}: UNREACHABLE at {host}:{port}: no answer within {timeout:?}", u.name);
            }
        }
    }
    match crate::app::open_ledger(&cfg).await {
        Ok(l) => match tokio::time::timeout(Duration::from_secs(5), l.ping()).await {
            Ok(Ok(())) => println!("ledger ({:?}): read/write ok", cfg.ledger.backend),
            Ok(Err(e)) => {
                failures += 1;
                println!("ledger: FAILED read/write: {e}");
            }
            Err(_) => {
                failures += 1;
                println!("ledger: FAILED: no answer within 5s");
            }
        },
        Err(e) => {
            failures += 1;
            println!("ledger: FAILED to open: {e}");
        }
    }
    if let Some(x) = &cfg.x402 {
        match crate::payment::rails::x402::check_supported(x).await {
            Ok(kinds) => {
                for k in kinds {
                    let v1 = k.v1_network.unwrap_or("-");
                    if k.v1 || k.v2 {
                        println!(
                            "facilitator {}: supports {} on {} (v1 {} as {v1}, v2 {})",
                            x.facilitator,
                            k.scheme,
                            k.network,
                            if k.v1 { "yes" } else { "no" },
                            if k.v2 { "yes" } else { "no" }
                        );
                    } else {
                        failures += 1;
                        println!(
                            "facilitator {}: does NOT list {} on {} in /supported; x402 payments there will fail",
                            x.facilitator, k.scheme, k.network
                        );
                    }
                }
            }
            Err(e) => {
                failures += 1;
                println!("facilitator {}: FAILED: {e}", x.facilitator);
            }
        }
    }
    if let Some(s) = &cfg.stripe {
        failures += crate::selfservice::doctor(s).await;
    }
    let base = cfg.public_base();
    let metered = metered_report(&cfg);
    for r in &cfg.routes {
        let methods = if r.methods.is_empty() {
            "ANY".to_owned()
        } else {
            r.methods.iter().map(|m| m.as_str()).collect::<Vec<_>>().join(",")
        };
        let (price, cost) = match r.pricing {
            Pricing::Free => {
                println!("route {}: {methods} {} is free", r.name, r.path);
                continue;
            }
            Pricing::Fixed(price) => (price, format!("costs {price} USD")),
            // x402 cannot pay a metered route (`check` refuses it): only credits are offered.
            Pricing::Metered(plan) => (plan.fixed, format!("charges per token (meter {})", plan.meter)),
        };
        println!(
            "route {}: {methods} {} {cost}; without payment a client gets 402 payment_missing \
(type {base}/.well-known/tollgate/problems/payment_missing) offering: {}",
            r.name,
            r.path,
            r.accept
                .iter()
                .map(|a| match *a {
                    crate::payment::rails::credits::NAME => {
                        format!("credits ({}: Bearer <key>)", cfg.credits.header_display)
                    }
                    crate::payment::rails::x402::NAME => match &cfg.x402 {
                        Some(x) => format!(
                            "x402 (exact, {} atomic units of {} on {} to {})",
                            price.get(),
                            x.primary.asset_text,
                            x.primary.network,
                            x.primary.pay_to_text
                        ),
                        None => "x402".to_owned(),
                    },
                    other => other.to_owned(),
                })
                .collect::<Vec<_>>()
                .join(", ")
        );
        for (_, lines) in metered.holds.iter().filter(|(route, _)| *route == r.name) {
            for line in lines {
                println!("{line}");
            }
        }
    }
    for w in &metered.warnings {
        println!("warning: {w}");
    }
    let warned = match metered.warnings.len() {
        0 => String::new(),
        n => format!(" ({n} warning{})", if n == 1 { "" } else { "s" }),
    };
    if failures == 0 {
        println!("doctor: all checks passed{warned}");
        ExitCode::SUCCESS
    } else {
        println!("doctor: {failures} check(s) failed{warned}");
        ExitCode::from(1)
    }
}

// === metered routes ===

/// The prompt of a "typical" request, in tokens, for the hold doctor reports. The
/// output is the model's `max_output_tokens`: a request that names no maximum.
pub(crate) const TYPICAL_INPUT_TOKENS: u64 = 500;

/// What doctor says about metered pricing: lines to print, and warnings (which do not
/// fail the run: the gateway works, but some client will be refused or some price is
/// dead config).
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct MeteredReport {
    /// Per metered route (by name), the lines printed under it.
    pub(crate) holds: Vec<(String, Vec<String>)>,
    pub(crate) warnings: Vec<String>,
}

impl MeteredReport {
    /// Every route's lines, in order.
    #[cfg(test)]
    fn lines(&self) -> Vec<String> {
        self.holds.iter().flat_map(|(_, lines)| lines.iter().cloned()).collect()
    }
}

/// The model vendor a `[[model]]` name belongs to, by its well-known prefixes; entries
/// of neither (`"*"`, `"llama*"`, a self-hosted model) may be served by any upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Vendor {
    OpenAi,
    OpenAiEmbeddings,
    Anthropic,
    Any,
}

/// Model names OpenAI's chat and Responses APIs serve start with one of these.
const OPENAI_CHAT_PREFIXES: [&str; 5] = ["gpt", "o1", "o3", "o4", "chatgpt"];
const OPENAI_EMBEDDING_PREFIXES: [&str; 1] = ["text-embedding"];
const ANTHROPIC_PREFIXES: [&str; 1] = ["claude"];

fn stem(m: &ModelPrice) -> &str {
    m.name.strip_suffix('*').unwrap_or(&m.name)
}

fn vendor(m: &ModelPrice) -> Vendor {
    let s = stem(m).to_ascii_lowercase();
    let starts = |prefixes: &[&str]| prefixes.iter().any(|p| s.starts_with(p));
    if starts(&ANTHROPIC_PREFIXES) {
        Vendor::Anthropic
    } else if starts(&OPENAI_EMBEDDING_PREFIXES) {
        Vendor::OpenAiEmbeddings
    } else if starts(&OPENAI_CHAT_PREFIXES) {
        Vendor::OpenAi
    } else {
        Vendor::Any
    }
}

/// Whether a route metered by `meter` can be sent a model this entry prices: an
/// Anthropic route is never sent `gpt-4o`, an OpenAI chat route never `claude-…` nor
/// an embedding model.
fn serves(meter: Meter, m: &ModelPrice) -> bool {
    match (meter, vendor(m)) {
        (_, Vendor::Any) => true,
        (Meter::AnthropicMessages, v) => v == Vendor::Anthropic,
        (Meter::OpenAiEmbeddings, v) => v == Vendor::OpenAiEmbeddings,
        (Meter::OpenAiChat | Meter::OpenAiResponses, v) => v == Vendor::OpenAi,
    }
}

/// The prefixes of the model names a route of `meter` is usually sent.
fn likely_prefixes(meter: Meter) -> &'static [&'static str] {
    match meter {
        Meter::AnthropicMessages => &ANTHROPIC_PREFIXES,
        Meter::OpenAiEmbeddings => &OPENAI_EMBEDDING_PREFIXES,
        Meter::OpenAiChat | Meter::OpenAiResponses => &OPENAI_CHAT_PREFIXES,
    }
}

/// Whether some entry prices models starting with `prefix` (an exact name or a
/// `prefix*` under it, or a prefix entry above it such as `"*"`).
fn prices_family(models: &[ModelPrice], prefix: &str) -> bool {
    models.iter().any(|m| {
        let s = stem(m).to_ascii_lowercase();
        s.starts_with(prefix) || (m.name.ends_with('*') && prefix.starts_with(&s))
    })
}

/// A model name only this entry is meant to match: its exact name, or its prefix
/// followed by a character no model name has, so that no longer entry claims it.
fn witness(m: &ModelPrice) -> String {
    match m.name.strip_suffix('*') {
        Some(stem) => format!("{stem}\u{0}"),
        None => m.name.clone(),
    }
}

/// Whether `m` is ever the entry a request's model selects (an entry whose witness
/// picks another entry is shadowed by it, an exact duplicate say).
fn reachable(models: &[ModelPrice], m: &ModelPrice) -> bool {
    meter::find_model(models, &witness(m)).is_some_and(|found| std::ptr::eq(found, m))
}

/// The hold of a typical request on `plan` with `model`'s prices.
fn typical_hold(plan: &MeterPlan, model: &ModelPrice) -> meter::Hold {
    let ask = Ask {
        model: witness(model),
        max_output: None,
        stream: false,
        include_usage: false,
        input_tokens: TYPICAL_INPUT_TOKENS,
    };
    meter::hold(&ask, model, plan.fixed, plan.max_price)
}

fn per_million(p: meter::PerMillion) -> String {
    p.0.to_string()
}

/// For each metered route, the hold of a typical request per `[[model]]` it can use;
/// warnings for entries no route can use and for routes whose likely models have no
/// price.
pub(crate) fn metered_report(cfg: &Config) -> MeteredReport {
    let mut out = MeteredReport::default();
    let metered: Vec<(&RouteConfig, MeterPlan)> = cfg
        .routes
        .iter()
        .filter_map(|r| match r.pricing {
            Pricing::Metered(plan) => Some((r, plan)),
            _ => None,
        })
        .collect();
    for m in &cfg.models {
        if !reachable(&cfg.models, m) {
            out.warnings.push(format!(
                "model {:?} can never be selected: a request for {:?} gets another [[model]] entry's price \
(an exact duplicate or an overlapping prefix); remove or rename it",
                m.name,
                witness(m).trim_end_matches('\u{0}')
            ));
        } else if metered.is_empty() {
            out.warnings.push(format!(
                "model {:?} is priced but no route is metered (set meter on a route), so it is never used",
                m.name
            ));
        } else if !metered.iter().any(|(_, plan)| serves(plan.meter, m)) {
            let meters: Vec<&str> = metered.iter().map(|(_, p)| p.meter.as_str()).collect();
            out.warnings.push(format!(
                "model {:?} is priced but no metered route serves it (routes meter {}), so it is never used",
                m.name,
                meters.join(", ")
            ));
        }
    }
    for (r, plan) in &metered {
        let usable: Vec<&ModelPrice> =
            cfg.models.iter().filter(|m| serves(plan.meter, m) && reachable(&cfg.models, m)).collect();
        let mut bounds = Vec::new();
        if plan.fixed > crate::money::Micros::ZERO {
            bounds.push(format!("fixed part {} USD", plan.fixed));
        }
        if let Some(max) = plan.max_price {
            bounds.push(format!("max_price {max} USD"));
        }
        let bounds = if bounds.is_empty() { String::new() } else { format!(" ({})", bounds.join(", ")) };
        let mut lines = vec![format!(
            "  a typical request ({TYPICAL_INPUT_TOKENS} input tokens, no output maximum, so the model's \
max_output_tokens) is held{bounds}:"
        )];
        for m in &usable {
            let hold = typical_hold(plan, m);
            let capped = if plan.max_price == Some(hold.amount) { ", capped by max_price" } else { "" };
            let output = if plan.meter == Meter::OpenAiEmbeddings || hold.output_tokens == 0 {
                String::new()
            } else {
                format!(" + {} output tokens at {} USD/1M", hold.output_tokens, per_million(m.output))
            };
            lines.push(format!(
                "    model {}: {} USD{capped} ({} input tokens at {} USD/1M{output}); then charged the usage the upstream reports",
                m.name,
                hold.amount,
                hold.input_tokens,
                per_million(m.input.max(m.cached_input).max(m.cache_write_input)),
            ));
        }
        if usable.is_empty() {
            lines
                .push("    no [[model]] entry serves this route: every request is refused 400 model_not_priced".into());
        }
        out.holds.push((r.name.clone(), lines));
        let prefixes = likely_prefixes(plan.meter);
        if !prefixes.iter().any(|p| prices_family(&cfg.models, p)) {
            let names: Vec<String> = prefixes.iter().map(|p| format!("{p}*")).collect();
            out.warnings.push(format!(
                "route {} (meter {}) has no price for the models its clients usually ask for ({}): they get \
400 model_not_priced; add [[model]] entries for them, or \"*\" for any model",
                r.name,
                plan.meter,
                names.join(", ")
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[server]
listen = "127.0.0.1:8080"

[[upstream]]
name = "api"
url = "http://127.0.0.1:3000"

[[route]]
name = "docs"
upstream = "api"
path = "/docs/*"
free = true
"#;

    fn route(name: &str, path: &str, meter: &str, extra: &str) -> String {
        format!(
            "\n[[route]]\nname = \"{name}\"\nupstream = \"api\"\npath = \"{path}\"\nmethods = [\"POST\"]\n\
meter = \"{meter}\"\naccept = [\"credits\"]\n{extra}\n"
        )
    }

    fn model(name: &str, input: &str, output: &str, max_output: u64) -> String {
        format!(
            "\n[[model]]\nname = \"{name}\"\ninput = \"{input}\"\noutput = \"{output}\"\nmax_output_tokens = {max_output}\n"
        )
    }

    fn report(rest: &str) -> MeteredReport {
        let text = format!("{BASE}{rest}");
        let cfg = Config::parse(&text, |_| None).unwrap_or_else(|e| panic!("{e}\n{text}"));
        metered_report(&cfg)
    }

    #[test]
    fn the_demo_config_reports_each_models_typical_hold_and_warns_of_nothing() {
        let up: std::net::SocketAddr = "127.0.0.1:3000".parse().unwrap();
        let text = crate::demo::demo_config("127.0.0.1:8080", "127.0.0.1:9090", up, std::path::Path::new("x.db"));
        let r = metered_report(&Config::parse(&text, |_| None).unwrap());
        assert_eq!(r.warnings, Vec::<String>::new());
        // 500 × 0.15 + 1024 × 0.60 = 75 + 614.4 → 690 micro-USD; 500 × 2.50 + 1024 × 10 = 11,490.
        assert_eq!(r.holds.iter().map(|(route, _)| route.as_str()).collect::<Vec<_>>(), ["chat"]);
        assert_eq!(r.lines().len(), 3, "{:#?}", r.lines());
        assert!(r.lines()[0].starts_with("  a typical request (500 input tokens"), "{}", r.lines()[0]);
        assert!(
            r.lines()[1].starts_with(
                "    model demo-mini: 0.00069 USD (500 input tokens at 0.15 USD/1M + 1024 output tokens at 0.60 USD/1M)"
            ),
            "{}",
            r.lines()[1]
        );
        assert!(r.lines()[2].starts_with("    model *: 0.01149 USD (500 input tokens"), "{}", r.lines()[2]);
    }

    #[test]
    fn fixed_part_and_max_price_bound_the_typical_hold() {
        let rest = route("chat", "/v1/chat/completions", "openai-chat", "price = \"0.001\"\nmax_price = \"0.02\"")
            + &model("gpt-4o-mini", "0.15", "0.60", 16384)
            + &model("gpt-4o", "2.50", "10.00", 16384);
        let r = report(&rest);
        assert_eq!(r.warnings, Vec::<String>::new());
        assert!(r.lines()[0].contains("(fixed part 0.001 USD, max_price 0.02 USD)"), "{}", r.lines()[0]);
        // 1000 fixed + 75 + 16384 × 0.60 = 9830.4 → 10,906 micro-USD: under the cap of 20,000.
        assert!(r.lines()[1].starts_with("    model gpt-4o-mini: 0.010906 USD (500"), "{}", r.lines()[1]);
        // 1000 + 1250 + 163,840 is far above the cap: the hold is the cap.
        assert!(r.lines()[2].starts_with("    model gpt-4o: 0.02 USD, capped by max_price ("), "{}", r.lines()[2]);
    }

    #[test]
    fn models_without_a_metered_route_are_never_used() {
        let r = report(&model("gpt-4o-mini", "0.15", "0.60", 16384));
        assert_eq!(r.holds, Vec::new());
        assert_eq!(r.warnings.len(), 1, "{:#?}", r.warnings);
        assert!(r.warnings[0].contains("\"gpt-4o-mini\" is priced but no route is metered"), "{}", r.warnings[0]);
    }

    #[test]
    fn an_anthropic_route_priced_only_for_openai_models_is_warned_both_ways() {
        let rest = route("claude", "/v1/messages", "anthropic-messages", "")
            + &model("gpt-4o-mini", "0.15", "0.60", 16384)
            + &model("o3*", "2.00", "8.00", 100_000);
        let r = report(&rest);
        assert_eq!(r.lines().len(), 2, "{:#?}", r.lines());
        assert!(r.lines()[1].contains("no [[model]] entry serves this route"), "{}", r.lines()[1]);
        assert_eq!(r.warnings.len(), 3, "{:#?}", r.warnings);
        assert!(r.warnings[0]
            .contains("\"gpt-4o-mini\" is priced but no metered route serves it (routes meter anthropic-messages)"));
        assert!(r.warnings[1].contains("\"o3*\" is priced but no metered route serves it"));
        assert!(r.warnings[2].contains("route claude (meter anthropic-messages) has no price for the models its clients usually ask for (claude*)"), "{}", r.warnings[2]);
    }

    #[test]
    fn an_openai_route_without_gpt_or_o_series_prices_is_warned() {
        let rest = route("chat", "/v1/chat/completions", "openai-chat", "")
            + &model("claude*", "3.00", "15.00", 64000)
            + &model("llama-3.1-8b", "0.05", "0.08", 8192);
        let r = report(&rest);
        // The self-hosted model is usable on an OpenAI-compatible route; the Claude one is not.
        assert_eq!(r.lines().len(), 2, "{:#?}", r.lines());
        assert!(r.lines()[1].starts_with("    model llama-3.1-8b: "), "{}", r.lines()[1]);
        assert_eq!(r.warnings.len(), 2, "{:#?}", r.warnings);
        assert!(r.warnings[0].contains("\"claude*\" is priced but no metered route serves it"));
        assert!(r.warnings[1].contains("route chat (meter openai-chat) has no price for the models its clients usually ask for (gpt*, o1*, o3*, o4*, chatgpt*)"), "{}", r.warnings[1]);
    }

    #[test]
    fn a_catch_all_or_a_family_prefix_prices_the_likely_models() {
        for entry in ["*", "claude-*", "claude-sonnet-4-5", "c*"] {
            let rest =
                route("claude", "/v1/messages", "anthropic-messages", "") + &model(entry, "3.00", "15.00", 64000);
            let r = report(&rest);
            assert_eq!(r.warnings, Vec::<String>::new(), "{entry}");
            assert_eq!(r.lines().len(), 2, "{entry}: {:#?}", r.lines());
        }
        let rest = route("emb", "/v1/embeddings", "openai-embeddings", "")
            + "\n[[model]]\nname = \"text-embedding-3-small\"\ninput = \"0.02\"\noutput = \"0\"\n";
        let r = report(&rest);
        assert_eq!(r.warnings, Vec::<String>::new());
        // 500 × 0.02 = 10 micro-USD, no output.
        assert_eq!(
            r.lines()[1],
            "    model text-embedding-3-small: 0.00001 USD (500 input tokens at 0.02 USD/1M); then charged the usage the upstream reports"
        );
    }

    #[test]
    fn an_entry_another_one_always_wins_over_is_reported_as_shadowed() {
        let rest = route("chat", "/v1/chat/completions", "openai-chat", "") + &model("gpt-4o", "2.50", "10.00", 16384);
        let mut cfg = Config::parse(&format!("{BASE}{rest}"), |_| None).unwrap();
        // The config refuses duplicate names; a duplicate that got through anyway is
        // never selected (the first one wins).
        let mut dup = cfg.models[0].clone();
        dup.output = meter::PerMillion(crate::money::Micros(5_000_000));
        cfg.models.push(dup);
        let r = metered_report(&cfg);
        assert_eq!(r.warnings.len(), 1, "{:#?}", r.warnings);
        assert!(r.warnings[0].starts_with("model \"gpt-4o\" can never be selected"), "{}", r.warnings[0]);
        // Only the reachable entry gets a hold line.
        assert_eq!(r.lines().len(), 2, "{:#?}", r.lines());
    }
}
