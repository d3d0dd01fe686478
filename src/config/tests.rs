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

#[test]
fn shipped_config_parses_and_validates() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/tollgate.toml")).unwrap();
    Config::parse(&text, |k| match k {
        "TOLLGATE_ADMIN_TOKEN" => Some("an-admin-token-for-tests".into()),
        _ => Some("x".into()),
    })
    .unwrap();
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
