//! `${VAR}` and `${VAR:-default}` expansion in every string value of the TOML tree,
//! before serde sees it. Every missing variable is reported, each with its key path.

pub(super) fn expand_env(
    v: &mut toml::Value,
    path: &mut String,
    env: &impl Fn(&str) -> Option<String>,
    errors: &mut Vec<String>,
) {
    match v {
        toml::Value::String(s) if s.contains("${") => match expand_str(s, env) {
            Ok(x) => *s = x,
            Err(e) => errors.push(format!("{path}: {e}")),
        },
        toml::Value::Array(items) => {
            for (i, item) in items.iter_mut().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                expand_env(item, path, env, errors);
                path.truncate(len);
            }
        }
        toml::Value::Table(t) => {
            for (k, item) in t.iter_mut() {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(k);
                expand_env(item, path, env, errors);
                path.truncate(len);
            }
        }
        _ => {}
    }
}

fn expand_str(s: &str, env: &impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or_else(|| "unclosed \"${\" in value".to_owned())?;
        let inner = &after[..end];
        let (name, default) = match inner.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (inner, None),
        };
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(format!("{inner:?} is not an environment variable name"));
        }
        match (env(name), default) {
            (Some(v), _) if !v.is_empty() || default.is_none() => out.push_str(&v),
            (_, Some(d)) => out.push_str(d),
            (None, None) => return Err(format!("environment variable {name} is not set")),
            (Some(v), None) => out.push_str(&v),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}
