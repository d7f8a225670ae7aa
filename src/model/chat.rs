//! Conversations as the model was trained on them: the model's own Jinja chat template
//! (`tokenizer.chat_template` of a GGUF, `chat_template` of a transformers
//! `tokenizer_config.json`), rendered with minijinja as transformers' `apply_chat_template`
//! renders it, and the training targets of a rendered conversation.
//!
//! Targets follow TRL's `assistant_only_loss` and transformers' `return_assistant_tokens_mask`:
//! each assistant message contributes the tokens of its content and of the end-of-turn token that
//! closes it; the headers, the whitespace after the end-of-turn token and every system and user
//! turn are context only. A message's span is found from two renderings, the conversation before
//! it with the generation prompt (where its content starts) and the conversation through it
//! (where it ends); both must be prefixes of the whole rendering, which holds for templates that
//! render each turn independently of the ones after it (ChatML, Llama 3, Mistral, Gemma).

use crate::error::{Error, Result};
use crate::model::tokenizer::Tokenizer;
use serde::{Deserialize, Serialize};

/// One message of a conversation (`role` is `system`, `user` or `assistant`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    /// A message of `role` with `content`.
    pub fn new(role: &str, content: &str) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Which assistant turns are training targets (`--loss-on`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LossOn {
    /// Every assistant turn (TRL's `assistant_only_loss=True`).
    #[default]
    Assistant,
    /// Every token of the rendered conversation (TRL's default language-modelling loss).
    All,
    /// The last assistant turn only (a conversation as context for its final answer).
    Last,
}

/// A compiled chat template.
#[derive(Debug)]
pub struct ChatTemplate {
    source: String,
    env: minijinja::Environment<'static>,
    bos_token: String,
    eos_token: String,
}

const NAME: &str = "chat_template";

fn jinja_err(what: &str, e: minijinja::Error) -> Error {
    // minijinja's Display gives the kind, the message and the line; its `detail` the rest.
    let mut msg = e.to_string();
    if let Some(d) = e.detail()
        && !msg.contains(d)
    {
        msg = format!("{msg}: {d}");
    }
    Error::arg("chat_template", format!("{what}: {msg}"))
}

impl ChatTemplate {
    /// Compiles `source` (Jinja, with Python's string methods as transformers' sandbox has
    /// them, `raise_exception`, and `bos_token`/`eos_token` defined). Errors: a template that
    /// does not parse, naming the line.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<Self> {
        let mut env = minijinja::Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        // Templates keep their own whitespace: transformers renders with trim_blocks and
        // lstrip_blocks.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_template_owned(NAME, source.to_string())
            .map_err(|e| jinja_err("the template does not parse", e))?;
        Ok(ChatTemplate {
            source: source.to_string(),
            env,
            bos_token: bos_token.into(),
            eos_token: eos_token.into(),
        })
    }

    /// The template's Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// `source` with `tok`'s BOS and EOS token strings. Errors: see [`ChatTemplate::new`].
    pub fn for_tokenizer(source: &str, tok: &Tokenizer) -> Result<Self> {
        let name = |id: u32| tok.id_to_token(id).unwrap_or_default();
        Self::new(source, &name(tok.bos_id()), &name(tok.eos_id()))
    }

    /// The conversation as text (transformers' `apply_chat_template(messages, tokenize=False,
    /// add_generation_prompt=...)`). Errors: the template raised (`raise_exception`) or failed,
    /// with its message.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let t = self
            .env
            .get_template(NAME)
            .map_err(|e| jinja_err("template", e))?;
        t.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })
        .map_err(|e| jinja_err("rendering the conversation", e))
    }
}

/// A conversation's tokens and which of them are training targets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RenderedChat {
    pub text: String,
    pub ids: Vec<u32>,
    /// Same length as `ids`.
    pub target: Vec<bool>,
    /// Token range `[start, end)` of each assistant turn's targets, in order.
    pub turns: Vec<(usize, usize)>,
}

/// Renders `messages` with `tmpl`, tokenizes the text (special tokens matched whole, none added)
/// and marks the targets `loss_on` asks for (see the module docs). `end_of_turn` is the token
/// that closes a turn (SmolLM2's `<|im_end|>`, the tokenizer's EOS): a span ends at its last
/// occurrence, the whitespace after it dropped. Errors: no assistant message, a rendering of a
/// prefix that is not a prefix of the whole (a template that rewrites earlier turns), a span
/// with no end-of-turn token, tokenizer errors.
pub fn render_conversation(
    tmpl: &ChatTemplate,
    tok: &Tokenizer,
    messages: &[Message],
    loss_on: LossOn,
    end_of_turn: u32,
) -> Result<RenderedChat> {
    let text = tmpl.render(messages, false)?;
    let (ids, offsets) = tok.encode_with_offsets(&text)?;
    let assistants: Vec<usize> = messages
        .iter()
        .enumerate()
        .filter(|(_, m)| m.role == "assistant")
        .map(|(i, _)| i)
        .collect();
    if assistants.is_empty() {
        return Err(Error::arg(
            "messages",
            "the conversation has no assistant message to train on",
        ));
    }
    let prefix_of = |part: &str, what: &str| -> Result<usize> {
        if text.starts_with(part) {
            Ok(part.len())
        } else {
            Err(Error::arg(
                "chat_template",
                format!(
                    "the rendering of the conversation {what} is not a prefix of the whole \
                     rendering; the template rewrites earlier turns, so assistant spans cannot \
                     be found"
                ),
            ))
        }
    };
    // The token range of byte range [a, b): tokens that start inside it.
    let tokens_in = |a: usize, b: usize| -> (usize, usize) {
        let s = offsets.partition_point(|&(o, _)| o < a);
        let e = offsets.partition_point(|&(o, _)| o < b);
        (s, e)
    };
    let mut turns = Vec::with_capacity(assistants.len());
    for &i in &assistants {
        let before = tmpl.render(&messages[..i], true)?;
        let through = tmpl.render(&messages[..=i], false)?;
        let a = prefix_of(
            &before,
            &format!("before message {i} (with the generation prompt)"),
        )?;
        let b = prefix_of(&through, &format!("through message {i}"))?;
        let (s, e) = tokens_in(a, b);
        let end = ids[s..e]
            .iter()
            .rposition(|&t| t == end_of_turn)
            .map(|k| s + k + 1)
            .ok_or_else(|| {
                Error::arg(
                    "messages",
                    format!(
                        "assistant message {i} renders without the end-of-turn token {end_of_turn}"
                    ),
                )
            })?;
        turns.push((s, end));
    }
    let mut target = vec![false; ids.len()];
    match loss_on {
        LossOn::All => target.iter_mut().for_each(|t| *t = true),
        LossOn::Assistant => {
            for &(s, e) in &turns {
                target[s..e].iter_mut().for_each(|t| *t = true);
            }
        }
        LossOn::Last => {
            if let Some(&(s, e)) = turns.last() {
                target[s..e].iter_mut().for_each(|t| *t = true);
            }
        }
    }
    Ok(RenderedChat {
        text,
        ids,
        target,
        turns,
    })
}

/// The default recipe's fixed ChatML (`train::data::render_chatml`) as a template: no default
/// system turn, `<|im_start|>{role}\n{content}<|im_end|>\n` per message, then
/// `<|im_start|>assistant\n` with the generation prompt. `--chat-template chatml` picks it; it
/// is also the fallback for a model without a template.
pub const CHATML: &str = "{% for message in messages %}<|im_start|>{{ message.role }}\n\
{{ message.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// Something to complete: text used as it is, or a conversation that the chat template renders
/// with the assistant's turn opened (`add_generation_prompt`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Prompt {
    Text(String),
    Chat(Vec<Message>),
}

impl Prompt {
    /// A prompt from one JSON value: `{"prompt": "..."}` (a user turn), `{"messages": [...]}`
    /// (a conversation to continue) or a bare message list. Errors name what is missing.
    pub fn from_json(v: &serde_json::Value) -> std::result::Result<Self, String> {
        if let Some(p) = v.get("prompt") {
            return p
                .as_str()
                .map(|s| Prompt::Text(s.to_string()))
                .ok_or_else(|| "`prompt` is not a string".to_string());
        }
        let list = v.get("messages").unwrap_or(v);
        let msgs: Vec<Message> = serde_json::from_value(list.clone()).map_err(|e| {
            format!("neither a `prompt` string nor a `messages` list of {{role, content}} ({e})")
        })?;
        if msgs.is_empty() {
            return Err("an empty conversation".into());
        }
        if let Some(m) = msgs.iter().find(|m| !ROLES.contains(&m.role.as_str())) {
            return Err(format!(
                "role {:?} (expected system, user or assistant)",
                m.role
            ));
        }
        Ok(Prompt::Chat(msgs))
    }

    /// The token ids to run: with a template, the conversation (a text prompt is one user turn)
    /// with `system` in front when it has no system turn, rendered with the generation prompt;
    /// without one (`--raw`), the text as it is. Errors: a conversation without a template, a
    /// template error, tokenizer errors.
    pub fn ids(
        &self,
        tmpl: Option<&ChatTemplate>,
        system: Option<&str>,
        tok: &Tokenizer,
    ) -> Result<Vec<u32>> {
        let Some(tmpl) = tmpl else {
            return match self {
                Prompt::Text(t) => tok.encode(t),
                Prompt::Chat(_) => Err(Error::arg(
                    "raw",
                    "a conversation (`messages`) needs the chat template; drop --raw",
                )),
            };
        };
        let mut msgs = match self {
            Prompt::Text(t) => vec![Message::new("user", t)],
            Prompt::Chat(m) => m.clone(),
        };
        if let Some(s) = system
            && msgs.first().is_none_or(|m| m.role != "system")
        {
            msgs.insert(0, Message::new("system", s));
        }
        tok.encode(&tmpl.render(&msgs, true)?)
    }
}

const ROLES: [&str; 3] = ["system", "user", "assistant"];
