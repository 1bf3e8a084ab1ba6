//! What the ext_proc stream reads from and writes to Envoy besides bodies:
//! request headers (`:path`, `x-request-id`), the subset hint Envoy forwards
//! in dynamic metadata, and the `envoy.lb` metadata the picker answers with.
//!
//! Names are the Gateway API Inference Extension's, so a gateway configured
//! for llm-d's endpoint picker works unchanged.

use envoy_types::pb::envoy::config::core::v3::{HeaderMap, Metadata};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};

/// The header Envoy's ORIGINAL_DST cluster reads the chosen `ip:port` from.
pub const DESTINATION_HEADER: &str = "x-gateway-destination-endpoint";
/// Dynamic-metadata namespace the destination is also published in (the
/// filter's `metadata_options.receiving_namespaces` must list it).
pub const LB_NAMESPACE: &str = "envoy.lb";
/// Dynamic-metadata namespace of the candidate subset a gateway may send
/// (`metadata_options.forwarding_namespaces` must list it).
pub const SUBSET_NAMESPACE: &str = "envoy.lb.subset_hint";
/// Key of the subset list inside [`SUBSET_NAMESPACE`].
pub const SUBSET_KEY: &str = "x-gateway-destination-endpoint-subset";

/// The value of a request header. Envoy 1.40 sends values in `raw_value`;
/// `value` is read as a fallback for older data planes.
pub fn header(headers: Option<&HeaderMap>, name: &str) -> Option<String> {
    let header = headers?
        .headers
        .iter()
        .find(|h| h.key.eq_ignore_ascii_case(name))?;
    if header.raw_value.is_empty() {
        Some(header.value.clone())
    } else {
        Some(String::from_utf8_lossy(&header.raw_value).into_owned())
    }
}

/// The candidate subset in `metadata`, if the gateway sent one: a list of
/// `ip:port` strings or one comma-separated string. Blank entries are dropped;
/// a hint that is present but names nothing stays an empty list, so the
/// picker answers 503 rather than ignoring the gateway's restriction.
pub fn subset_hint(metadata: Option<&Metadata>) -> Option<Vec<String>> {
    let hint = metadata?.filter_metadata.get(SUBSET_NAMESPACE)?;
    let value = hint.fields.get(SUBSET_KEY)?;
    let mut endpoints = Vec::new();
    match value.kind.as_ref()? {
        Kind::StringValue(s) => push_split(&mut endpoints, s),
        Kind::ListValue(list) => {
            for item in &list.values {
                if let Some(Kind::StringValue(s)) = &item.kind {
                    push_split(&mut endpoints, s);
                }
            }
        }
        _ => return None,
    }
    Some(endpoints)
}

fn push_split(out: &mut Vec<String>, s: &str) {
    out.extend(
        s.split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(str::to_owned),
    );
}

/// `{"envoy.lb": {"x-gateway-destination-endpoint": endpoint}}` as the
/// `dynamic_metadata` of the request-headers response.
pub fn destination_metadata(endpoint: &str) -> Struct {
    let inner = Struct {
        fields: [(DESTINATION_HEADER.to_owned(), string_value(endpoint))].into(),
    };
    Struct {
        fields: [(
            LB_NAMESPACE.to_owned(),
            Value {
                kind: Some(Kind::StructValue(inner)),
            },
        )]
        .into(),
    }
}

fn string_value(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::config::core::v3::HeaderValue;
    use envoy_types::pb::google::protobuf::ListValue;

    fn hint(value: Value) -> Metadata {
        let inner = Struct {
            fields: [(SUBSET_KEY.to_owned(), value)].into(),
        };
        Metadata {
            filter_metadata: [(SUBSET_NAMESPACE.to_owned(), inner)].into(),
            ..Default::default()
        }
    }

    #[test]
    fn subset_as_list_or_comma_string() {
        let list = Value {
            kind: Some(Kind::ListValue(ListValue {
                values: vec![
                    string_value("127.0.0.1:8000"),
                    string_value(" 127.0.0.2:8000 "),
                ],
            })),
        };
        assert_eq!(
            subset_hint(Some(&hint(list))),
            Some(vec![
                "127.0.0.1:8000".to_owned(),
                "127.0.0.2:8000".to_owned()
            ])
        );
        let csv = string_value("127.0.0.1:8000,127.0.0.3:8000,");
        assert_eq!(
            subset_hint(Some(&hint(csv))),
            Some(vec![
                "127.0.0.1:8000".to_owned(),
                "127.0.0.3:8000".to_owned()
            ])
        );
        assert_eq!(subset_hint(Some(&hint(string_value("")))), Some(vec![]));
        assert_eq!(subset_hint(Some(&Metadata::default())), None);
        assert_eq!(subset_hint(None), None);
    }

    #[test]
    fn header_prefers_raw_value() {
        let headers = HeaderMap {
            headers: vec![
                HeaderValue {
                    key: ":path".into(),
                    raw_value: b"/v1/completions".to_vec(),
                    ..Default::default()
                },
                HeaderValue {
                    key: "x-request-id".into(),
                    value: "abc".into(),
                    ..Default::default()
                },
            ],
        };
        assert_eq!(
            header(Some(&headers), ":path").as_deref(),
            Some("/v1/completions")
        );
        assert_eq!(
            header(Some(&headers), "X-Request-Id").as_deref(),
            Some("abc")
        );
        assert_eq!(header(Some(&headers), "missing"), None);
    }
}
