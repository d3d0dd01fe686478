use std::time::Duration;

use super::*;
use crate::money::Micros;

const MINIMAL: &str = r#"
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

fn parse(text: &str) -> Result<Config, ConfigErrors> {
    Config::parse(text, |k| match k {
        "SET" => Some("value-from-env".to_owned()),
        _ => None,
    })
}

fn errors(text: &str) -> Vec<String> {
    parse(text).err().map(|e| e.0).unwrap_or_default()
}

#[test]
fn minimal_config_is_valid() {
    assert_eq!(errors(MINIMAL), Vec::<String>::new());
}

fn shipped(path: &str) -> Config {
    let text = std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap();
    Config::parse(&text, |k| match k {
        "TOLLGATE_ADMIN_TOKEN" => Some("an-admin-token-for-tests".into()),
        _ => Some("x".into()),
    })
    .unwrap_or_else(|e| panic!("{path}:\n{e}"))
}

#[test]
fn shipped_config_parses_and_validates() {
    let cfg = shipped("config/tollgate.toml");
    assert_eq!(cfg.routes[0].pricing, Pricing::Fixed(Micros(2_000)));
    assert_eq!(cfg.routes[0].accept, ["credits", "x402"]);
    assert_eq!(cfg.routes[1].pricing, Pricing::Free);
    assert!(cfg.x402.is_some());
}

#[test]
fn shipped_deploy_config_parses_and_validates() {
    let cfg = shipped("deploy/tollgate.toml");
    assert_eq!(cfg.ledger.backend, LedgerBackend::Postgres);
    assert_eq!(cfg.ledger.statement_timeout, Duration::from_secs(2));
    assert_eq!(cfg.upstreams[0].timeout, Duration::from_secs(30));
    assert_eq!(cfg.credits.spend_cap, Some(SpendCap { amount: Micros(5_000_000), per: Duration::from_secs(86_400) }));
}

#[test]
fn unknown_keys_are_errors_with_their_path() {
    let e = errors(&format!(
        "{MINIMAL}\n[[route]]\nname = \"x\"\nupstream = \"api\"\npath = \"/x\"\nfree = true\nprise = \"1\"\n"
    ));
    assert_eq!(e.len(), 1);
    assert!(e[0].starts_with("route[1]"), "{e:?}");
    assert!(e[0].contains("prise"), "{e:?}");
}

#[test]
fn syntax_errors_say_where() {
    let e = errors("[server\nlisten = 1");
    assert!(e[0].starts_with("syntax:"), "{e:?}");
    assert!(e[0].contains("line 1"), "{e:?}");
}

#[test]
fn env_vars_expand_and_missing_ones_are_all_reported() {
    let cfg = parse(&format!("{MINIMAL}\n[admin]\ntoken = \"${{SET}}-suffix\"\n")).unwrap();
    assert_eq!(cfg.admin.token.as_deref(), Some("value-from-env-suffix"));
    let cfg = parse(&format!("{MINIMAL}\n[admin]\ntoken = \"${{UNSET:-fallback-token-123456}}\"\n")).unwrap();
    assert_eq!(cfg.admin.token.as_deref(), Some("fallback-token-123456"));
    let e =
        errors(&format!("{MINIMAL}\n[admin]\ntoken = \"${{MISSING_A}}\"\n[ledger]\npath = \"${{MISSING_B}}/x.db\"\n"));
    assert_eq!(e.len(), 2, "{e:?}");
    assert!(e.iter().any(|l| l == "admin.token: environment variable MISSING_A is not set"), "{e:?}");
    assert!(e.iter().any(|l| l == "ledger.path: environment variable MISSING_B is not set"), "{e:?}");
}

#[test]
fn three_mistakes_give_three_errors() {
    let text = r#"
[server]
listen = "not-an-address"

[[upstream]]
name = "api"
url = "http://127.0.0.1:3000"
timeout = "soon"

[[route]]
name = "chat"
upstream = "ap"
path = "/v1/*"
price = "0.002"
accept = ["credits"]
"#;
    let e = errors(text);
    assert_eq!(e.len(), 3, "{e:#?}");
    assert!(e[0].starts_with("server.listen: "));
    assert!(e[1].starts_with("upstream[0].timeout: "));
    assert_eq!(e[2], "route[0].upstream: no upstream named \"ap\"");
}

fn route(extra: &str) -> String {
    format!("{MINIMAL}\n[[route]]\nname = \"r\"\nupstream = \"api\"\n{extra}\n")
}

fn one_error(text: &str, path: &str, needle: &str) {
    let e = errors(text);
    assert_eq!(e.len(), 1, "{e:#?}");
    assert!(e[0].starts_with(path), "{e:?} should start with {path}");
    assert!(e[0].contains(needle), "{e:?} should mention {needle}");
}

#[test]
fn rule_price_must_be_exact_decimal() {
    one_error(&route("path = \"/p\"\nprice = \"0.0000001\"\naccept = [\"credits\"]"), "route[1].price", "6 decimal");
    one_error(&route("path = \"/p\"\nprice = \"abc\"\naccept = [\"credits\"]"), "route[1].price", "decimal");
    one_error(&route("path = \"/p\"\nprice = \"0\"\naccept = [\"credits\"]"), "route[1].price", "above zero");
}

#[test]
fn rule_priced_or_free() {
    one_error(&route("path = \"/p\"\naccept = [\"credits\"]"), "route[1].price", "required");
    one_error(&route("path = \"/p\"\nfree = true\nprice = \"1\""), "route[1].free", "cannot be free");
    one_error(&route("path = \"/p\"\nprice = \"1\""), "route[1].accept", "at least one rail");
    one_error(&route("path = \"/p\"\nfree = true\naccept = [\"credits\"]"), "route[1].accept", "free route");
}

#[test]
fn rule_accept_names_known_rails() {
    one_error(&route("path = \"/p\"\nprice = \"1\"\naccept = [\"bitcoin\"]"), "route[1].accept[0]", "unknown rail");
    one_error(&route("path = \"/p\"\nprice = \"1\"\naccept = [\"x402\"]"), "route[1].accept[0]", "[x402]");
    one_error(
        &route("path = \"/p\"\nprice = \"1\"\naccept = [\"credits\", \"credits\"]"),
        "route[1].accept[1]",
        "twice",
    );
}

#[test]
fn rule_path_pattern() {
    one_error(&route("path = \"p\"\nfree = true"), "route[1].path", "start with '/'");
    one_error(&route("path = \"/a/*/b\"\nfree = true"), "route[1].path", "final");
}

#[test]
fn rule_methods() {
    one_error(&route("path = \"/p\"\nfree = true\nmethods = [\"G T\"]"), "route[1].methods[0]", "HTTP method");
}

#[test]
fn rule_names_unique() {
    one_error(
        &route("name2 = 1")
            .replace("name2 = 1", "path = \"/p\"\nfree = true")
            .replace("name = \"r\"", "name = \"docs\""),
        "route[1].name",
        "duplicate",
    );
    one_error(
        &format!("{MINIMAL}\n[[upstream]]\nname = \"api\"\nurl = \"http://x\"\n"),
        "upstream[1].name",
        "duplicate",
    );
}

#[test]
fn rule_upstream_url_and_headers() {
    one_error(&format!("{MINIMAL}\n[[upstream]]\nname = \"b\"\nurl = \"ftp://x\"\n"), "upstream[1].url", "http(s)");
    one_error(
        &format!("{MINIMAL}\n[[upstream]]\nname = \"b\"\nurl = \"http://x\"\nheaders = {{ \"Bad Name\" = \"v\" }}\n"),
        "upstream[1].headers.Bad Name",
        "header name",
    );
}

#[test]
fn rule_rate_limits() {
    one_error(
        &route("path = \"/p\"\nprice = \"1\"\naccept = [\"credits\"]\nrate_limit = { per_key = \"10/fortnight\" }"),
        "route[1].rate_limit.per_key",
        "rate",
    );
    one_error(
        &route("path = \"/p\"\nprice = \"1\"\naccept = [\"credits\"]\nrate_limit = { per_ip = \"10/s\", burst = 0 }"),
        "route[1].rate_limit.burst",
        "at least 1",
    );
    assert_eq!(parse_rate("100/min").unwrap(), Rate { count: 100, per: Duration::from_secs(60) });
}

#[test]
fn rule_spend_cap() {
    one_error(&format!("{MINIMAL}\n[credits]\nspend_cap = \"25/week\"\n"), "credits.spend_cap", "spend cap");
    assert_eq!(
        parse_spend_cap("25.00/day").unwrap(),
        SpendCap { amount: Micros(25_000_000), per: Duration::from_secs(86_400) }
    );
}

#[test]
fn rule_admin_token_length() {
    one_error(&format!("{MINIMAL}\n[admin]\ntoken = \"short\"\n"), "admin.token", "16");
}

#[test]
fn rule_postgres_needs_url() {
    one_error(&format!("{MINIMAL}\n[ledger]\nbackend = \"postgres\"\n"), "ledger.url", "required");
}

#[test]
fn rule_x402_addresses_and_network() {
    let x = "\n[x402]\nfacilitator = \"http://127.0.0.1:1\"\nnetwork = \"base-sepolia\"\nasset = \"0x036CbD53842c5426634e7929541eC2318f3dCF7e\"\npay_to = \"0x12\"\n";
    let e = errors(&format!("{MINIMAL}{x}"));
    assert_eq!(e.len(), 2, "{e:?}");
    assert!(e[0].starts_with("x402.network"));
    assert!(e[1].starts_with("x402.pay_to"));
}

#[test]
fn rule_durations_and_limits() {
    let e = errors(&MINIMAL.replace(
        "listen = \"127.0.0.1:8080\"",
        "listen = \"127.0.0.1:8080\"\nheader_read_timeout = \"fast\"\nmax_header_bytes = 10\nmax_connections = 0",
    ));
    assert_eq!(e.len(), 3, "{e:?}");
}

#[test]
fn trusted_proxies_must_be_networks() {
    one_error(
        &MINIMAL.replace(
            "listen = \"127.0.0.1:8080\"",
            "listen = \"127.0.0.1:8080\"\ntrusted_proxies = [\"10.0.0.0/8\", \"nope\"]",
        ),
        "server.trusted_proxies[1]",
        "CIDR",
    );
}

fn server(extra: &str) -> String {
    MINIMAL.replace("listen = \"127.0.0.1:8080\"", &format!("listen = \"127.0.0.1:8080\"\n{extra}"))
}

#[test]
fn rule_idle_timeout_is_a_duration() {
    one_error(&server("idle_timeout = \"a minute\""), "server.idle_timeout", "not a duration");
}

#[test]
fn rule_idle_timeout_is_above_zero() {
    one_error(&server("idle_timeout = \"0s\""), "server.idle_timeout", "above zero");
}

#[test]
fn rule_http2_max_concurrent_streams_at_least_one() {
    one_error(&server("http2_max_concurrent_streams = 0"), "server.http2_max_concurrent_streams", "at least 1");
}

#[test]
fn connection_limits_have_defaults() {
    let cfg = parse(MINIMAL).unwrap();
    assert_eq!(cfg.server.idle_timeout, Duration::from_secs(60));
    assert_eq!(cfg.server.http2_max_concurrent_streams, 100);
    let cfg = parse(&server("idle_timeout = \"90s\"\nhttp2_max_concurrent_streams = 250")).unwrap();
    assert_eq!(cfg.server.idle_timeout, Duration::from_secs(90));
    assert_eq!(cfg.server.http2_max_concurrent_streams, 250);
}

// === typed values: what a checked config holds ===

#[test]
fn defaults_are_typed() {
    let cfg = parse(MINIMAL).unwrap();
    assert_eq!(cfg.server.listen, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(cfg.server.header_read_timeout, Duration::from_secs(10));
    assert_eq!(cfg.server.shutdown_timeout, Duration::from_secs(30));
    assert_eq!(cfg.admin.listen, "127.0.0.1:9090".parse().unwrap());
    assert_eq!(cfg.ledger.statement_timeout, Duration::from_secs(2));
    let u = &cfg.upstreams[0];
    assert_eq!(u.url.as_str(), "http://127.0.0.1:3000");
    assert_eq!(
        (u.connect_timeout, u.timeout, u.pool_idle_timeout),
        (Duration::from_secs(2), Duration::from_secs(60), Duration::from_secs(90))
    );
    assert_eq!(cfg.credits.header, http::header::AUTHORIZATION);
    assert_eq!(cfg.credits.header_display, "Authorization");
    let r = &cfg.routes[0];
    assert_eq!(r.path, PathPattern::Prefix("/docs".into()));
    assert_eq!(r.path.to_string(), "/docs/*");
    assert_eq!(r.upgrades, ["websocket"]);
    assert!(r.accept.is_empty());
}

#[test]
fn route_values_are_typed() {
    let cfg = parse(&route(
        "path = \"/p\"\nmethods = [\"post\", \"GET\"]\nprice = \"0.002\"\naccept = [\"credits\"]\n\
rate_limit = { per_key = \"10/s\", per_ip = \"100/min\", burst = 20 }\nupgrades = [\"WebSocket\"]",
    ))
    .unwrap();
    let r = &cfg.routes[1];
    assert_eq!(r.methods, [http::Method::POST, http::Method::GET]);
    assert_eq!(r.pricing, Pricing::Fixed(Micros(2_000)));
    assert_eq!(r.pricing.price(), Some(Micros(2_000)));
    assert_eq!(
        r.rate_limit,
        Some(RateLimit {
            per_key: Some(Rate { count: 10, per: Duration::from_secs(1) }),
            per_ip: Some(Rate { count: 100, per: Duration::from_secs(60) }),
            burst: Some(20),
        })
    );
    assert_eq!(r.upgrades, ["websocket"]);
}

#[test]
fn server_values_are_typed() {
    let cfg = parse(&MINIMAL.replace(
        "listen = \"127.0.0.1:8080\"",
        "listen = \"127.0.0.1:8080\"\npublic_url = \"https://api.example.com/\"\ntrusted_proxies = [\"10.0.0.0/8\", \"192.0.2.1\"]",
    ))
    .unwrap();
    assert_eq!(cfg.public_base(), "https://api.example.com");
    assert_eq!(cfg.server.trusted_proxies, ["10.0.0.0/8".parse().unwrap(), "192.0.2.1/32".parse().unwrap()]);
    assert_eq!(parse(MINIMAL).unwrap().public_base(), "http://127.0.0.1:8080");
}

#[test]
fn upstream_headers_are_typed() {
    let cfg = parse(&format!(
        "{MINIMAL}\n[[upstream]]\nname = \"b\"\nurl = \"https://b.example/v1\"\nheaders = {{ Authorization = \"Bearer ${{SET}}\" }}\n"
    ))
    .unwrap();
    let u = &cfg.upstreams[1];
    assert_eq!(u.url.uri().host(), Some("b.example"));
    assert_eq!(u.headers, [(http::header::AUTHORIZATION, http::HeaderValue::from_static("Bearer value-from-env"))]);
}

#[test]
fn x402_values_are_typed() {
    let x = "\n[x402]\nfacilitator = \"https://x402.org/facilitator\"\nnetwork = \"eip155:84532\"\nasset = \"0x036CbD53842c5426634e7929541eC2318f3dCF7e\"\npay_to = \"0x209693Bc6afc0C5328bA36FaF03C514EF312287C\"\n\
[[x402.offer]]\nnetwork = \"eip155:8453\"\nasset = \"0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913\"\n";
    let cfg = parse(&format!("{MINIMAL}{x}")).unwrap();
    let x = cfg.x402.unwrap();
    assert_eq!(x.facilitator.as_str(), "https://x402.org/facilitator");
    assert_eq!(x.facilitator_timeout, Duration::from_secs(10));
    assert_eq!(x.primary.chain_id, 84532);
    assert_eq!(x.offers[0].chain_id, 8453);
    assert_eq!(x.offers[0].pay_to, x.primary.pay_to, "an offer without pay_to inherits [x402]'s");
    assert_eq!(x.all_offers().count(), 2);
}

// === rules that moved with the typed parse ===

#[test]
fn rule_public_url() {
    one_error(
        &MINIMAL
            .replace("listen = \"127.0.0.1:8080\"", "listen = \"127.0.0.1:8080\"\npublic_url = \"api.example.com\""),
        "server.public_url",
        "http(s) URL",
    );
}

#[test]
fn rule_upstream_url_has_no_query() {
    one_error(&format!("{MINIMAL}\n[[upstream]]\nname = \"b\"\nurl = \"http://x/?a=1\"\n"), "upstream[1].url", "query");
}

#[test]
fn rule_upstream_header_values() {
    one_error(
        &format!("{MINIMAL}\n[[upstream]]\nname = \"b\"\nurl = \"http://x\"\nheaders = {{ X-A = \"a\\nb\" }}\n"),
        "upstream[1].headers.X-A",
        "header value",
    );
}

#[test]
fn rule_upstream_durations() {
    one_error(
        &format!("{MINIMAL}\n[[upstream]]\nname = \"b\"\nurl = \"http://x\"\nconnect_timeout = \"2 parsecs\"\n"),
        "upstream[1].connect_timeout",
        "duration",
    );
}

#[test]
fn rule_ledger_statement_timeout() {
    one_error(&format!("{MINIMAL}\n[ledger]\nstatement_timeout = \"later\"\n"), "ledger.statement_timeout", "duration");
}

#[test]
fn rule_credits_header_name() {
    one_error(&format!("{MINIMAL}\n[credits]\nheader = \"X Key\"\n"), "credits.header", "header name");
}

#[test]
fn rule_route_upgrades() {
    one_error(&route("path = \"/p\"\nfree = true\nupgrades = [\"h2c\"]"), "route[1].upgrades[0]", "h2c");
    one_error(&route("path = \"/p\"\nfree = true\nupgrades = [\"a b\"]"), "route[1].upgrades[0]", "protocol name");
}

#[test]
fn rule_accept_messages_name_the_rails_that_exist() {
    let known: Vec<&str> = crate::payment::rails::KNOWN.iter().map(|r| r.name).collect();
    let e = errors(&route("path = \"/p\"\nprice = \"1\"\naccept = [\"foo\"]"));
    assert_eq!(e, [format!("route[1].accept[0]: unknown rail \"foo\" (known: {})", known.join(", "))]);
    assert_eq!(e[0], "route[1].accept[0]: unknown rail \"foo\" (known: credits, x402)");
    let e = errors(&route("path = \"/p\"\nprice = \"1\"\naccept = [\"x402\"]"));
    assert_eq!(e, ["route[1].accept[0]: \"x402\" needs an [x402] section"]);
    let e = errors(&route("path = \"/p\"\nprice = \"1\""));
    assert_eq!(e, ["route[1].accept: name at least one rail: \"credits\" or \"x402\""]);
}

#[test]
fn rule_x402_facilitator_and_offers() {
    let x = "\n[x402]\nfacilitator = \"x402.org\"\nnetwork = \"eip155:84532\"\nasset = \"0x036CbD53842c5426634e7929541eC2318f3dCF7e\"\npay_to = \"0x12\"\nmax_timeout_seconds = 0\nfacilitator_timeout = \"soon\"\n\
[[x402.offer]]\nnetwork = \"eip155:8453\"\nasset = \"0x1\"\n";
    let e = errors(&format!("{MINIMAL}{x}"));
    let keys: Vec<&str> = e.iter().map(|l| l.split(':').next().unwrap_or_default()).collect();
    // The bad pay_to an offer inherits is reported once, where it is written.
    assert_eq!(
        keys,
        [
            "x402.facilitator",
            "x402.facilitator_timeout",
            "x402.pay_to",
            "x402.offer[0].asset",
            "x402.max_timeout_seconds"
        ],
        "{e:#?}"
    );
}

#[test]
fn rule_x402_facilitator_headers() {
    let x = "\n[x402]\nfacilitator = \"http://127.0.0.1:1\"\nnetwork = \"eip155:84532\"\nasset = \"0x036CbD53842c5426634e7929541eC2318f3dCF7e\"\npay_to = \"0x209693Bc6afc0C5328bA36FaF03C514EF312287C\"\nfacilitator_headers = { \"Bad Name\" = \"v\" }\n";
    one_error(&format!("{MINIMAL}{x}"), "x402.facilitator_headers.Bad Name", "header name");
}

#[test]
fn every_error_of_every_section_in_one_run() {
    let text = format!(
        "{}\n[ledger]\npool_size = 0\n[credits]\nspend_cap = \"1/week\"\n",
        route("path = \"p\"\nprice = \"x\"\naccept = [\"credits\"]")
            .replace("listen = \"127.0.0.1:8080\"", "listen = \"127.0.0.1:8080\"\nshutdown_timeout = \"never\"")
    );
    let e = errors(&text);
    let keys: Vec<&str> = e.iter().map(|l| l.split(':').next().unwrap_or_default()).collect();
    assert_eq!(
        keys,
        ["server.shutdown_timeout", "ledger.pool_size", "route[1].path", "route[1].price", "credits.spend_cap"],
        "{e:#?}"
    );
}

#[test]
fn path_patterns_display_as_written() {
    for p in ["/*", "/docs/*", "/health", "/v1/chat/*"] {
        assert_eq!(PathPattern::parse(p).unwrap().to_string(), p);
    }
}

#[test]
fn rule_x402_asset_symbol_is_letters_and_digits() {
    let x = "\n[x402]\nfacilitator = \"http://127.0.0.1:1\"\nnetwork = \"eip155:84532\"\nasset = \"0x036CbD53842c5426634e7929541eC2318f3dCF7e\"\npay_to = \"0x209693Bc6afc0C5328bA36FaF03C514EF312287C\"\nasset_symbol = \"US DC\"\n";
    one_error(&format!("{MINIMAL}{x}"), "x402.asset_symbol", "not a token symbol");
}

// === metered routes and [[model]] ===

const MODEL: &str =
    "\n[[model]]\nname = \"gpt-4o-mini\"\ninput = \"0.15\"\noutput = \"0.60\"\nmax_output_tokens = 16384\n";

fn metered(extra: &str) -> String {
    route(&format!("path = \"/v1/chat/completions\"\naccept = [\"credits\"]\nmeter = \"openai-chat\"\n{extra}"))
}

#[test]
fn metered_route_and_models_parse_with_their_defaults() {
    let text = metered("price = \"0.0001\"\nmax_price = \"0.50\"\non_disconnect = \"stop\"") + MODEL;
    let cfg = parse(&text).unwrap();
    let Pricing::Metered(plan) = cfg.routes[1].pricing else { panic!("{:?}", cfg.routes[1].pricing) };
    assert_eq!(plan.meter, crate::meter::Meter::OpenAiChat);
    assert_eq!((plan.fixed, plan.max_price), (Micros(100), Some(Micros(500_000))));
    assert_eq!(plan.on_disconnect, OnDisconnect::Stop);
    assert_eq!((plan.max_request_bytes, plan.max_response_bytes), (8 * 1024 * 1024, 16 * 1024 * 1024));
    let m = &cfg.models[0];
    assert_eq!((m.input.0, m.output.0, m.max_output_tokens), (Micros(150_000), Micros(600_000), 16384));
    assert_eq!((m.cached_input, m.cache_write_input), (m.input, m.input), "cache prices default to input");
    let plan = match parse(&(metered("") + MODEL)).unwrap().routes[1].pricing {
        Pricing::Metered(p) => p,
        other => panic!("{other:?}"),
    };
    assert_eq!((plan.fixed, plan.max_price, plan.on_disconnect), (Micros::ZERO, None, OnDisconnect::Finish));
}

#[test]
fn rule_metered_routes_need_a_known_meter_models_and_a_metered_rail() {
    one_error(&(metered("").replace("openai-chat", "openai") + MODEL), "route[1].meter", "unknown meter");
    one_error(&metered(""), "route[1].meter", "no [[model]]");
    let x402 = metered("").replace("accept = [\"credits\"]", "accept = [\"credits\", \"x402\"]") + MODEL;
    one_error(&x402, "route[1].accept[1]", "cannot pay a metered route");
    let e = errors(&(metered("free = true") + MODEL));
    assert!(e.contains(&"route[1].free: a route cannot be free and metered".to_owned()), "{e:?}");
    one_error(&(metered("max_price = \"0\"") + MODEL), "route[1].max_price", "above zero");
    one_error(&(metered("price = \"1\"\nmax_price = \"0.5\"") + MODEL), "route[1].max_price", "fixed price");
    one_error(&(metered("max_request_bytes = 0") + MODEL), "route[1].max_request_bytes", "above zero");
    one_error(&(metered("on_disconnect = \"later\"") + MODEL), "route[1].on_disconnect", "unknown variant");
}

#[test]
fn rule_meter_keys_only_on_metered_routes() {
    let text = route("path = \"/p\"\nprice = \"1\"\naccept = [\"credits\"]\nmax_price = \"2\"");
    one_error(&text, "route[1].max_price", "only to metered routes");
}

#[test]
fn rule_model_prices_are_exact_and_bounded() {
    let with = |m: &str| metered("") + m;
    one_error(
        &with("\n[[model]]\nname = \"m\"\ninput = \"0.0000001\"\noutput = \"1\"\nmax_output_tokens = 1\n"),
        "model[0].input",
        "6 decimal",
    );
    one_error(
        &with("\n[[model]]\nname = \"m\"\ninput = \"1\"\noutput = \"1\"\n"),
        "model[0].max_output_tokens",
        "required",
    );
    one_error(
        &with("\n[[model]]\nname = \"g*pt\"\ninput = \"1\"\noutput = \"0\"\n"),
        "model[0].name",
        "only at the end",
    );
    one_error(&with(&format!("{MODEL}{MODEL}")), "model[1].name", "duplicate");
    one_error(&with("\n[[model]]\nname = \"m\"\ninput = \"1\"\n"), "model[0]", "output");
    // Free output (embeddings) needs no output bound.
    assert!(parse(&with("\n[[model]]\nname = \"e\"\ninput = \"0.02\"\noutput = \"0\"\n")).is_ok());
}
