use serde_json::json;

use super::*;

fn template(src: &str) -> ChatTemplate {
    let specials = [
        ("bos_token".to_string(), json!("<s>")),
        ("eos_token".to_string(), json!("</s>")),
    ];
    ChatTemplate::new(src, &specials).expect("compile")
}

fn render(
    t: &ChatTemplate,
    messages: serde_json::Value,
    opts: &ChatOptions,
) -> Result<String, TokensError> {
    t.render(messages.as_array().expect("array"), opts)
}

const SIMPLE: &str = "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}";

#[test]
fn context_has_special_tokens_and_generation_prompt() {
    let t = template(SIMPLE);
    let msgs = json!([{"role": "user", "content": "hi"}]);
    assert_eq!(
        render(&t, msgs.clone(), &ChatOptions::default()).unwrap(),
        "<s>[user]hi\n[assistant]"
    );
    let no_gen = ChatOptions {
        add_generation_prompt: false,
        ..Default::default()
    };
    assert_eq!(render(&t, msgs, &no_gen).unwrap(), "<s>[user]hi\n");
}

#[test]
fn trim_and_lstrip_blocks_like_transformers() {
    // Jinja2 with trim_blocks + lstrip_blocks: the indentation before a block
    // tag and the newline after it disappear.
    let src = "{% for m in messages %}\n    {% if m.role == 'user' %}\nU:{{ m.content }}\n    {% endif %}\n{% endfor %}";
    let t = template(src);
    let msgs = json!([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]);
    assert_eq!(
        render(&t, msgs, &ChatOptions::default()).unwrap(),
        "U:a\nU:b\n"
    );
}

#[test]
fn text_parts_join_with_newline_for_string_templates() {
    let t = template(SIMPLE);
    assert_eq!(t.content_format(), ContentFormat::String);
    let msgs = json!([{"role": "user", "content": [
        {"type": "text", "text": "one"}, "two", {"type": "text", "text": null},
        {"type": "input_text", "text": "three"}]}]);
    let opts = ChatOptions {
        add_generation_prompt: false,
        ..Default::default()
    };
    assert_eq!(
        render(&t, msgs, &opts).unwrap(),
        "<s>[user]one\ntwo\nthree\n"
    );
}

#[test]
fn openai_format_detected_and_rendered_as_parts() {
    let src = "{% for message in messages %}{% for part in message['content'] %}<{{ part.type }}:{{ part.text }}>{% endfor %}{% endfor %}";
    let t = template(src);
    assert_eq!(t.content_format(), ContentFormat::OpenAi);
    let msgs = json!([{"role": "user", "content": "plain"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]);
    let opts = ChatOptions {
        add_generation_prompt: false,
        ..Default::default()
    };
    assert_eq!(
        render(&t, msgs.clone(), &opts).unwrap(),
        "<text:plain><text:a><text:b>"
    );
    // Forcing `string` hands the template a string; iterating it yields chars.
    let forced = ChatOptions {
        content_format: ContentFormat::String,
        ..opts
    };
    assert!(render(&t, msgs, &forced).is_ok());
}

#[test]
fn content_format_detection_variants() {
    for (src, want) in [
        (
            "{% for c in message.content %}{% endfor %}",
            ContentFormat::OpenAi,
        ),
        (
            "{%- for c in m[\"content\"] | selectattr('type') -%}{% endfor %}",
            ContentFormat::OpenAi,
        ),
        (
            "{% set parts = message['content'] %}{% for p in parts %}{% endfor %}",
            ContentFormat::OpenAi,
        ),
        (
            "{% for m in messages %}{{ m['content'] }}{% endfor %}",
            ContentFormat::String,
        ),
        (
            "{% for m in messages[1:] %}{% endfor %}",
            ContentFormat::String,
        ),
    ] {
        assert_eq!(detect_content_format(src), want, "{src}");
    }
}

#[test]
fn none_and_booleans_print_like_python() {
    let t = template(
        "{{ none }}|{{ true }}|{{ false }}|{{ messages[0].missing }}|{{ 1.0 }}|{{ 7 // 2 }}",
    );
    let out = render(
        &t,
        json!([{"role": "user", "content": "x"}]),
        &ChatOptions::default(),
    )
    .unwrap();
    assert_eq!(out, "None|True|False||1.0|3");
}

#[test]
fn raise_exception_becomes_an_error_with_its_message() {
    let t = template(
        "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok",
    );
    let err = render(
        &t,
        json!([{"role": "assistant", "content": "x"}]),
        &ChatOptions::default(),
    )
    .expect_err("must raise");
    assert!(err.to_string().contains("first must be user"), "{err}");
}

#[test]
fn pycompat_string_and_dict_methods() {
    let src = "{% for m in messages %}{{ m.content.strip().upper() }}|{{ m.content.startswith('  he') }}|{{ m.content.split()|length }}{% endfor %}|{% for k, v in extra.items() %}{{ k }}={{ v }};{% endfor %}";
    let t = template(src);
    let mut opts = ChatOptions::default();
    opts.template_kwargs
        .insert("extra".into(), json!({"a": 1, "b": "two"}));
    let out = render(
        &t,
        json!([{"role": "user", "content": "  hello world "}]),
        &opts,
    )
    .unwrap();
    assert_eq!(out, "HELLO WORLD|True|2|a=1;b=two;");
}

#[test]
fn tools_documents_default_to_none_and_tojson_is_pythons() {
    let t = template(
        "{% if tools is not none %}{{ tools | tojson }}{% else %}no tools{% endif %}|{{ documents is none }}",
    );
    let msgs = json!([{"role": "user", "content": "x"}]);
    assert_eq!(
        render(&t, msgs.clone(), &ChatOptions::default()).unwrap(),
        "no tools|True"
    );
    let opts = ChatOptions {
        tools: Some(json!([{"name": "f", "n": 1.5, "ok": true}])),
        ..Default::default()
    };
    assert_eq!(
        render(&t, msgs, &opts).unwrap(),
        r#"[{"n": 1.5, "name": "f", "ok": true}]|True"#
    );
}

#[test]
fn tool_calls_arguments_parsed_and_empty_lists_dropped() {
    let t = template(
        "{% for m in messages %}{% if m.tool_calls is defined %}{% for c in m.tool_calls %}{{ c.function.arguments.city }}{{ c.function.arguments | tojson }}{% endfor %}{% else %}[none]{% endif %}{% endfor %}",
    );
    let msgs = json!([
        {"role": "assistant", "content": null, "tool_calls": [
            {"id": "1", "type": "function", "function": {"name": "w", "arguments": "{\"city\": \"Paris\"}"}},
            {"id": "2", "type": "function", "function": {"name": "w", "arguments": ""}}]},
        {"role": "assistant", "content": "x", "tool_calls": []},
    ]);
    let opts = ChatOptions {
        add_generation_prompt: false,
        ..Default::default()
    };
    assert_eq!(
        render(&t, msgs, &opts).unwrap(),
        "Paris{\"city\": \"Paris\"}{}[none]"
    );
    let bad = json!([{"role": "assistant", "tool_calls": [{"function": {"name": "w", "arguments": "{"}}]}]);
    assert!(render(&t, bad, &opts).is_err());
}

#[test]
fn continue_final_message_cuts_after_the_text() {
    let t = template(
        "{% for m in messages %}<{{ m.role }}>{{ m.content | trim }}</{{ m.role }}>{% endfor %}",
    );
    let opts = ChatOptions {
        add_generation_prompt: false,
        continue_final_message: true,
        ..Default::default()
    };
    // The template trims the trailing space: transformers cuts after the
    // stripped text.
    let msgs =
        json!([{"role": "user", "content": "q"}, {"role": "assistant", "content": "The sky is "}]);
    assert_eq!(
        render(&t, msgs, &opts).unwrap(),
        "<user>q</user><assistant>The sky is"
    );
    let both = ChatOptions {
        add_generation_prompt: true,
        ..opts
    };
    assert!(render(&t, json!([{"role": "user", "content": "q"}]), &both).is_err());
}

#[test]
fn generation_tags_render_their_body() {
    let src = "{% for m in messages %}{%- generation -%}\n  [{{ m.content }}]\n{%- endgeneration %}{% endfor %}";
    assert!(rewrite_generation_tags(src).contains("{%- if true -%}"));
    let t = template(src);
    let out = render(
        &t,
        json!([{"role": "assistant", "content": "a"}]),
        &ChatOptions::default(),
    )
    .unwrap();
    assert_eq!(out, "[a]");
}

#[test]
fn strftime_now_and_loop_controls_are_available() {
    let t = template(
        "{% for m in messages %}{% if loop.index0 == 1 %}{% break %}{% endif %}{{ m.content }}{% endfor %}|{{ strftime_now('%Y') | length }}",
    );
    let msgs = json!([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]);
    assert_eq!(render(&t, msgs, &ChatOptions::default()).unwrap(), "a|4");
}

#[test]
fn bad_messages_are_errors_not_panics() {
    let t = template(SIMPLE);
    for bad in [
        json!(["not an object"]),
        json!([{"content": "no role"}]),
        json!([{"role": "user", "content": 5}]),
        json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
        json!([{"role": "user", "content": [{"text": "no type"}]}]),
    ] {
        assert!(matches!(
            render(&t, bad, &ChatOptions::default()),
            Err(TokensError::Messages(_))
        ));
    }
    assert!(ChatTemplate::new("{% for %}", &[]).is_err());
}

/// A template that would loop for hours.
pub(crate) const LOOPS: &str =
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}";
/// One that would write 1e9 copies of a string (6 GB at 6 bytes).
pub(crate) const REPEATS: &str =
    "{% for i in range(100000) %}{% for j in range(10000) %}{{ 'repeat' }}{% endfor %}{% endfor %}";

#[test]
fn runaway_templates_stop_at_their_bounds() {
    let msgs = json!([{"role": "user", "content": "hi"}]);
    for (name, src) in [("loop", LOOPS), ("repeat", REPEATS)] {
        let started = std::time::Instant::now();
        let err =
            render(&template(src), msgs.clone(), &ChatOptions::default()).expect_err("bounded");
        assert!(err.is_limit(), "{name}: {err}");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "{name} took {:?}",
            started.elapsed()
        );
    }
    // The output cap holds even with fuel to spare.
    let limits = ChatLimits {
        fuel: u64::MAX,
        max_output_bytes: 1 << 20,
        ..ChatLimits::default()
    };
    let t = ChatTemplate::with_limits(REPEATS, &[], limits).expect("compile");
    let err = render(&t, msgs.clone(), &ChatOptions::default()).expect_err("capped");
    assert!(matches!(err, TokensError::Limit(_)), "{err}");
    // Message count and text size.
    let limits = ChatLimits {
        max_messages: 2,
        max_input_bytes: 10,
        ..ChatLimits::default()
    };
    let t = ChatTemplate::with_limits(SIMPLE, &[], limits).expect("compile");
    let three = json!([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "user", "content": "c"}]);
    assert!(render(&t, three, &ChatOptions::default()).is_err_and(|e| e.is_limit()));
    let long = json!([{"role": "user", "content": "more than ten bytes"}]);
    assert!(render(&t, long, &ChatOptions::default()).is_err_and(|e| e.is_limit()));
    // Within the bounds the same template renders as before.
    let ok = json!([{"role": "user", "content": "hi"}]);
    assert_eq!(
        render(&t, ok, &ChatOptions::default()).expect("renders"),
        "[user]hi\n[assistant]"
    );
}
