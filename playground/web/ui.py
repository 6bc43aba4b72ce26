"""The Gradio app: `build_ui(service) -> gr.Blocks`. Callbacks are thin: they call `ChatService`.

Every action exists twice on purpose: once wired to the visible components (private events that
return component updates) and once as a named public endpoint (`/send`, `/vote`, ...) that takes
plain values and returns the pair as JSON for `gradio_client`. Both share the session's `gr.State`.

Text from people and from the model is rendered as markdown (replies are written in it, as FastChat and
Open WebUI show them), but HTML in it is shown as typed, never rendered or run: see `shown`.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING

import gradio as gr

from playground.chat import ChatError, ChatService, ChatSession, Pair, pair_summary
from playground.loop import TrainingLoop
from playground.serving.generation import SampledReply, SamplingSettings
from playground.serving.limits import MAX_NEW_TOKENS_LIMIT, MAX_TEMPERATURE, MIN_TEMPERATURE
from playground.web.auth import AUTH_MESSAGE, LOGOUT_PATH, Accounts, claim_name, is_admin, signed_in, user_of
from store import SLOTS

if TYPE_CHECKING:
    from playground.dashboard import Dashboard

log = logging.getLogger(__name__)

# Sends and regenerates share one limit: as many at once as the shared decode loop takes (rows and its
# queue, which tells each person their place); without the loop, one at a time (two separate decode
# loops would only split the memory bandwidth).
GENERATE_CONCURRENCY = "generate"
CHOICE_LABELS = {"a": "A is better", "b": "B is better", "tie": "Tie", "both_bad": "Both are bad"}
FINISH_LABELS = {"stop": "end of turn", "length": "length limit", None: "writing…"}
# The conversation and both reply panels render text alike, so neither reply looks better for its layout.
CHAT_RENDERING = dict(render_markdown=True, sanitize_html=True, line_breaks=True)

CSS = """
/* Markdown drops a line's leading spaces; keep them in paragraphs (code blocks keep theirs in <pre>).
   Not on the whole message: there it would turn the newlines between blocks into blank lines. */
.message-content .md p { white-space: pre-wrap; }
.badge { font-size: 0.85em; opacity: 0.85; }
.vote-row button { min-width: 120px; }
"""


# A fence opens with 3+ backticks or tildes; indented too, since models indent fences inside list items.
FENCE = re.compile(r"^[ \t]*(`{3,}|~{3,})")
# A code span: a backtick run, then the next run of the same length, within one paragraph.
CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`)((?:(?!\n[ \t]*\n)[\s\S])*?)(?<!`)\1(?!`)")
MARKUP = re.compile(r"(\\*)([&<])")  # '&' or '<' with the backslashes before it
ENTITIES = {"&": "&amp;", "<": "&lt;"}


def shown(role: str, text: str) -> dict:
    """A chat message for display: markdown rendered, HTML shown as typed.

    HTML is shown as text rather than left to the sanitiser to strip: a judge must see the reply that is
    stored and trained on, and a sanitised `<img>` or `<details>` would hide or change part of it (or
    fetch a URL). Escaping `&` and `<` outside code turns every tag into text; inside code markdown shows
    characters literally already, so code keeps `a < b`. The Chatbot's sanitiser stays on behind this
    as the wall against script (and `javascript:` links, which markdown can write without any '<').
    """
    return {"role": role, "content": markdown_source(text)}


def markdown_source(text: str) -> str:
    """`text` with '&' and '<' escaped outside fenced code blocks and code spans."""
    out, prose, fence = [], [], None
    for line in text.split("\n"):
        opener = FENCE.match(line)
        if fence is None:
            if opener:
                out.append(escape_prose("\n".join(prose)) if prose else None)
                prose, fence = [], opener.group(1)
                out.append(line)
            else:
                prose.append(line)
            continue
        out.append(line)
        closer = opener.group(1) if opener else ""
        if closer[:1] == fence[0] and len(closer) >= len(fence) and not line[opener.end():].strip():
            fence = None
    if prose:
        out.append(escape_prose("\n".join(prose)))
    return "\n".join(part for part in out if part is not None)


def escape_prose(text: str) -> str:
    """Escape '&' and '<' outside code spans; one after an odd number of backslashes is literal already."""
    def escape(chunk: str) -> str:
        return MARKUP.sub(lambda m: m[0] if len(m[1]) % 2 else m[1] + ENTITIES[m[2]], chunk)

    pieces, start = [], 0
    for span in CODE_SPAN.finditer(text):
        pieces += [escape(text[start:span.start()]), span[0]]
        start = span.end()
    return "".join(pieces) + escape(text[start:])


def conversation(session: ChatSession) -> list[dict]:
    """The conversation panel: the session's messages, but the turn being judged ends at the person's message.

    Until a vote or a better reply picks the continuation, the session would go on from reply A; showing
    it here would repeat A and nudge the judge toward the left reply. Once judged, it shows what was picked.
    """
    messages = session.messages()
    pair = session.pair
    pending = (pair is not None and not pair.generating and pair.choice is None and pair.edit is None
               and not pair.withheld)  # a pair with a withheld reply takes no vote: nothing to bias
    if pending and session.user_message is not None:
        messages = messages[:-1]  # messages() ends with the pair's continuation exactly then
    return [shown(m["role"], m["content"]) for m in messages]


def badge(pair: Pair | None, reply: SampledReply | None) -> str:
    """What is known of one reply: its version (for an arena pair only after the vote), length, finish."""
    if pair is None or reply is None:
        return ""
    if reply.slot in pair.withheld:
        return "🚫 withheld by the moderation check"
    rating = pair.ratings.get(reply.slot)
    version = pair.versions[SLOTS.index(reply.slot)] if pair.revealed else "version hidden until you vote"
    parts = [f"`{version}`", f"{reply.n_tokens} tokens", FINISH_LABELS.get(reply.finish_reason, "")]
    if pair.best_of > 1:
        parts.insert(1, f"best of {pair.best_of} by {pair.reward_model}")
    if rating:
        parts.append("👍 rated up" if rating == "up" else "👎 rated down")
    if pair.choice == reply.slot:
        parts.append("**chosen**")
    return " · ".join(parts)


def by_line(model_id: str, pair: Pair | None) -> str:
    """The line above the replies: the model, and which version wrote them (an arena pair: after the vote)."""
    line = f"Model **{model_id}**"
    if pair is None:
        return line
    if not pair.arena:
        return line + f" · these replies by **{pair.version}**"
    if not pair.revealed:
        return line + " · a blind comparison: the versions are shown after your vote"
    a, b = pair.versions
    return line + f" · blind arena: A was **{a}**, B was **{b}** (live: {pair.version})"


def notice(session: ChatSession) -> str:
    lines = [f"⚠️ {n}" for n in session.notes]
    pair = session.pair
    if pair is not None and pair.generating and pair.ahead is not None:
        ahead = "1 request" if pair.ahead == 1 else f"{pair.ahead} requests"
        lines.append(f"⏳ Waiting for the model: {ahead} ahead of you." if pair.ahead else
                     "⏳ Waiting for the model: yours is next.")
    if pair is not None and pair.generating and pair.held and pair.ahead is None:
        lines.append("The replies are shown once they are written and checked by the moderation hook.")
    if pair is not None and not pair.generating and pair.withheld:
        for slot, reason in sorted(pair.withheld.items()):
            lines.append(f"🚫 Reply {slot.upper()} was withheld by the moderation check: {reason}")
        lines.append("This pair cannot be judged: Regenerate for a new pair, or send your next message.")
        return "\n\n".join(lines)
    if pair is not None and not pair.generating:
        if pair.choice:
            lines.append(f"Saved: {CHOICE_LABELS[pair.choice]}. Send your next message to continue.")
        elif pair.reply_ids:
            lines.append("Which reply is better? Your vote trains the next version.")
        if pair.edit:
            lines.append("Saved your better reply.")
    return "\n\n".join(lines)


def build_ui(service: ChatService, loop: TrainingLoop | None = None, title: str = "RLHF Playground",
             dashboard: "Dashboard | None" = None, auth: bool = False) -> gr.Blocks:
    """The page: tabs for the chat, the drift dashboard (with `dashboard`) and the admin panel (with `loop`).
    `auth`: the page is served behind sign-in (`launch` with accounts), the admin tab shown to admins only."""
    model_id = service.policy.model_id
    generate_limit = service.concurrent_generations()
    with gr.Blocks(title=title, fill_width=True) as demo:
        session = gr.State(lambda: ChatSession())  # a factory: each browser session gets its own
        with gr.Row(equal_height=True):
            gr.Markdown(f"## {title}")
            # With --auth: who is signed in, and the way out (Gradio's /logout returns to the login page).
            account = gr.Markdown(elem_id="account", visible=False)
            sign_out = gr.Button("Sign out", link=LOGOUT_PATH, size="sm", scale=0, visible=False, elem_id="sign-out")
        status = gr.Markdown(elem_id="status")
        loop_status = gr.Markdown(elem_id="loop-status", visible=loop is not None)
        round_progress = gr.Slider(0, 1, value=0, label="Round progress", interactive=False, visible=False,
                                   elem_id="round-progress")
        tabs = gr.Tabs(elem_id="tabs")
        with tabs:
            chat_tab = gr.Tab("Chat", id="chat", elem_id="chat-tab")
            with chat_tab:
                history = gr.Chatbot(
                    label="Conversation", height=260, buttons=["copy_all"], elem_id="history", **CHAT_RENDERING,
                    placeholder="Send a message: you will get two replies to compare.",
                )
                with gr.Row(equal_height=True):
                    panels, badges, thumbs = {}, {}, {}
                    for slot in ("a", "b"):
                        with gr.Column(elem_id=f"column-{slot}"):
                            gr.Markdown(f"**Reply {slot.upper()}**")
                            panels[slot] = gr.Chatbot(
                                show_label=False, height=300, **CHAT_RENDERING,
                                elem_id=f"reply-{slot}", elem_classes="reply-panel", buttons=["copy"],
                            )
                            with gr.Row(equal_height=True):
                                badges[slot] = gr.Markdown(elem_id=f"badge-{slot}", elem_classes="badge")
                                thumbs[slot, "up"] = gr.Button("👍 Good", size="sm", interactive=False, scale=0,
                                                               elem_id=f"up-{slot}")
                                thumbs[slot, "down"] = gr.Button("👎 Bad", size="sm", interactive=False, scale=0,
                                                                 elem_id=f"down-{slot}")
                with gr.Row(elem_classes="vote-row"):
                    votes = {
                        choice: gr.Button(label, interactive=False, elem_id=f"vote-{choice}",
                                          variant="primary" if choice in "ab" else "secondary")
                        for choice, label in CHOICE_LABELS.items()
                    }
                note = gr.Markdown(elem_id="notice")
                with gr.Row():
                    message = gr.Textbox(
                        # lines=1 is what makes Enter send: Gradio's textarea sends on Enter only when lines == 1
                        # (and on Shift+Enter when lines > 1); max_lines lets it grow, Shift+Enter adds a line.
                        show_label=False, placeholder="Type a message and press Enter (Shift+Enter for a new line)",
                        lines=1, max_lines=8, scale=5, elem_id="message",
                    )
                    send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                with gr.Row():
                    regenerate = gr.Button("Regenerate", interactive=False, elem_id="regenerate")
                    new_chat = gr.Button("New conversation", elem_id="new-conversation")
                with gr.Accordion("Write a better reply", open=False):
                    edit_text = gr.Textbox(show_label=False, lines=4, placeholder="The reply you would have wanted")
                    edit_save = gr.Button("Save better reply", interactive=False, elem_id="save-edit")
                with gr.Accordion("Sampling settings", open=False):
                    temperature = gr.Slider(MIN_TEMPERATURE, MAX_TEMPERATURE, value=SamplingSettings.temperature,
                                            step=0.05, label="Temperature")
                    top_p = gr.Slider(0.05, 1.0, value=SamplingSettings.top_p, step=0.01, label="Top-p")
                    max_new_tokens = gr.Slider(1, MAX_NEW_TOKENS_LIMIT, value=SamplingSettings.max_new_tokens, step=1,
                                               label="Max new tokens")
                    system_prompt = gr.Textbox(
                        value="", lines=2, label="System prompt (applies from the next conversation's first message)")
            dashboard_tab = None
            if dashboard is not None:
                from playground.web.dashboard import build_dashboard

                dashboard_tab = gr.Tab("Dashboard", id="dashboard", elem_id="dashboard-tab")
                with dashboard_tab:
                    build_dashboard(dashboard.data, dashboard.compare)
            if loop is not None:
                from playground.web.admin import build_admin

                admin = build_admin(loop, service, visible=not auth)  # the third tab; with auth, for admins
        sampling = [temperature, top_p, max_new_tokens, system_prompt]

        judge_buttons = [*votes.values(), *thumbs.values(), edit_save]
        view_outputs = [history, panels["a"], panels["b"], badges["a"], badges["b"], note, status,
                        *judge_buttons, regenerate, send, new_chat]

        def panel(pair: Pair | None, reply: SampledReply | None) -> list:
            if reply is None:
                return []
            if reply.slot in pair.withheld:  # never shown: only why
                return [shown("assistant", f"🚫 Withheld by the moderation check: {pair.withheld[reply.slot]}")]
            return [shown("assistant", reply.text)]

        def view(state: ChatSession) -> list:
            pair = state.pair
            busy = pair is not None and pair.generating
            judgeable = pair is not None and not busy and not pair.withheld
            replies = {r.slot: r for r in pair.replies} if pair else {}
            out = [
                conversation(state),
                panel(pair, replies.get("a")),
                panel(pair, replies.get("b")),
                badge(pair, replies.get("a")),
                badge(pair, replies.get("b")),
                notice(state),
                by_line(model_id, pair),
            ]
            out += [gr.Button(interactive=judgeable) for _ in judge_buttons]
            out += [gr.Button(interactive=pair is not None and not busy), gr.Button(interactive=not busy),
                    gr.Button(interactive=not busy)]
            return out

        def settings_of(temp, p, max_tokens) -> SamplingSettings:
            try:
                return SamplingSettings(float(temp), float(p), int(max_tokens))
            except (TypeError, ValueError) as exc:
                raise gr.Error(f"Sampling settings: {exc}") from exc

        def guarded(fn, *args):
            try:
                return fn(*args)
            except ChatError as exc:
                raise gr.Error(str(exc)) from exc

        def streamed(iterator_fn, state, *args):
            try:
                for _ in iterator_fn(state, *args):
                    yield state
            except ChatError as exc:
                raise gr.Error(str(exc)) from exc

        # -- browser events -----------------------------------------------------------------------

        def refused(exc: gr.Error) -> None:
            # A toast that says why, the page left as it was: raised as an error, Gradio would cover every
            # output (the conversation, both replies, the typed message) with "Error" until the next event.
            log.info("refused in the page: %s", exc.message)
            gr.Warning(exc.message)

        def on_send(state, text, temp, p, max_tokens, system):
            if state.conversation_id is None and state.pair is None:
                state.system_prompt = system or ""
            try:
                settings = settings_of(temp, p, max_tokens)
                for state in streamed(service.send, state, text, settings):
                    # The box is cleared only once the pair is done: a failed send loses nothing typed.
                    yield [state, gr.skip() if state.pair.generating else ""] + view(state)
            except gr.Error as exc:
                refused(exc)
                yield [state, gr.skip()] + view(state)

        def on_regenerate(state, temp, p, max_tokens):
            try:
                for state in streamed(service.regenerate, state, settings_of(temp, p, max_tokens)):
                    yield [state] + view(state)
            except gr.Error as exc:
                refused(exc)
                yield [state] + view(state)

        def judge(fn, *fixed):
            def run(state, *args):
                try:
                    guarded(fn, state, *fixed, *args)
                except gr.Error as exc:
                    refused(exc)
                return [state] + view(state)
            return run

        send_args = dict(fn=signed_in(on_send), inputs=[session, message, *sampling],
                         outputs=[session, message, *view_outputs],
                         concurrency_id=GENERATE_CONCURRENCY, concurrency_limit=generate_limit,
                         api_visibility="private")
        send.click(**send_args)
        message.submit(**send_args)
        regenerate.click(signed_in(on_regenerate), [session, temperature, top_p, max_new_tokens],
                         [session, *view_outputs],
                         concurrency_id=GENERATE_CONCURRENCY, concurrency_limit=generate_limit,
                         api_visibility="private")
        for choice, button in votes.items():
            button.click(signed_in(judge(service.vote, choice), "vote"), [session], [session, *view_outputs],
                         api_visibility="private")
        for (slot, rating), button in thumbs.items():
            button.click(signed_in(judge(service.rate, slot, rating), "rate"), [session], [session, *view_outputs],
                         api_visibility="private")
        edit_save.click(signed_in(judge(service.edit), "edit"), [session, edit_text], [session, *view_outputs],
                        api_visibility="private")

        def on_new(state):
            try:
                guarded(service.new_conversation, state)
            except gr.Error as exc:
                refused(exc)
                return [state, gr.skip()] + view(state)
            return [state, ""] + view(state)

        new_chat.click(signed_in(on_new), [session], [session, edit_text, *view_outputs], api_visibility="private")
        demo.load(signed_in(lambda state: [state] + view(state), "page load"), [session], [session, *view_outputs],
                  api_visibility="private")

        # With auth: who is signed in, the sign-out button, and the admin tab for admins only (hiding it is
        # for the view: the admin actions refuse annotators on the server, buttons and API alike).
        admin_tab = [admin["panel"]] if loop is not None else []

        def on_account(request: gr.Request):
            user = user_of(request)
            if user is None:
                return [gr.skip()] * (2 + len(admin_tab))
            admin_role = is_admin(request)
            line = f"Signed in as **{escape_prose(user)}** ({'admin' if admin_role else 'annotator'})"
            return [gr.Markdown(line, visible=True), gr.Button(visible=True)] + [gr.Tab(visible=admin_role)] * len(
                admin_tab)

        demo.load(on_account, None, [account, sign_out, *admin_tab], api_visibility="private")

        # -- the training loop: status every few seconds, a toast when a new version goes live -----
        if loop is not None:
            from playground.web.admin import STATUS_REFRESH_S, TabView, curves_frame, runs_frame
            from playground.web.admin import progress_fraction, status_line, version_choices
            from playground.web.admin import reward_model_choices, reward_models_frame

            timer = gr.Timer(STATUS_REFRESH_S)

            tab = gr.State(lambda: TabView())  # this tab's view of the loop, apart from its chat session

            def on_tick(view_state: TabView):
                current = loop.status()  # one computation a second, shared by every open tab
                if view_state.seen_version is not None and view_state.seen_version != current["live"]:
                    gr.Info(f"Version {current['live']} is now live: your next message is answered by it.")
                view_state.seen_version = current["live"]
                fraction = progress_fraction(current)
                line = [view_state, status_line(current),
                        gr.Slider(value=fraction, visible=current["running"] is not None)]
                # The rounds table, the curves and the version list only while the admin panel is open.
                return line + (admin_view(view_state) if view_state.admin_open else [gr.skip()] * len(admin_outputs))

            def admin_view(view_state: TabView) -> list:
                return [runs_frame(loop), *curve_frames(view_state), gr.Dropdown(choices=version_choices(loop)),
                        reward_models_frame(loop), gr.Dropdown(choices=reward_model_choices(loop))]

            def curve_frames(view_state: TabView) -> list:
                return [curves_frame(loop, view_state.curves_run, key) for key in admin["plots"]]

            def on_panel(view_state: TabView, is_open: bool):
                view_state.admin_open = is_open
                return [view_state] + (admin_view(view_state) if is_open else [gr.skip()] * len(admin_outputs))

            admin_outputs = [admin["runs"], *admin["plots"].values(), admin["version"],
                             admin["reward_models"], admin["reward_pick"]]
            tick_outputs = [tab, loop_status, round_progress, *admin_outputs]
            timer.tick(on_tick, [tab], tick_outputs, api_visibility="private", show_progress="hidden")
            demo.load(on_tick, [tab], tick_outputs, api_visibility="private")
            # The admin tab's tables refresh while it is the tab shown; choosing another tab stops them.
            admin["panel"].select(lambda v: on_panel(v, True), [tab], [tab, *admin_outputs], api_visibility="private")
            for other in (chat_tab, dashboard_tab):
                if other is not None:
                    other.select(lambda v: on_panel(v, False), [tab], [tab, *admin_outputs], api_visibility="private")

            def pick_run(view_state: TabView, text: str):
                text = (text or "").strip()
                if text and not text.isdigit():
                    raise gr.Error(f"{text!r} is not a round id.")
                view_state.curves_run = int(text) if text else None
                return (view_state, *curve_frames(view_state))

            admin["run_pick"].submit(pick_run, [tab, admin["run_pick"]],
                                     [tab, *admin["plots"].values()], api_visibility="private")

        # -- the public API: the same actions, plain values in, the pair as JSON out ---------------
        with gr.Group(visible=False):
            api_text = gr.Textbox()
            api_slot = gr.Textbox()
            api_value = gr.Textbox()
            api_num1, api_num2, api_num3 = gr.Number(), gr.Number(), gr.Number()
            api_flag = gr.Checkbox(value=None)
            api_out = gr.JSON()
            api_trigger = gr.Button()

        def api_settings(temperature, top_p, max_new_tokens) -> SamplingSettings:
            default = SamplingSettings()
            return settings_of(
                default.temperature if temperature is None else temperature,
                default.top_p if top_p is None else top_p,
                default.max_new_tokens if max_new_tokens is None else max_new_tokens,
            )

        def api_send(state, message: str, temperature: float | None = None, top_p: float | None = None,
                     max_new_tokens: int | None = None, system_prompt: str | None = None):
            if state.conversation_id is None and state.pair is None:
                state.system_prompt = system_prompt or ""
            for state in streamed(service.send, state, message, api_settings(temperature, top_p, max_new_tokens)):
                yield state, pair_summary(state)

        def api_regenerate(state, temperature: float | None = None, top_p: float | None = None,
                           max_new_tokens: int | None = None):
            for state in streamed(service.regenerate, state, api_settings(temperature, top_p, max_new_tokens)):
                yield state, pair_summary(state)

        def api_vote(state, choice: str):
            guarded(service.vote, state, choice)
            return state, pair_summary(state)

        def api_rate(state, slot: str, rating: str):
            guarded(service.rate, state, slot, rating)
            return state, pair_summary(state)

        def api_edit(state, text: str):
            guarded(service.edit, state, text)
            return state, pair_summary(state)

        def api_new_conversation(state, user: str | None = None, simulated: bool | None = None,
                                 request: gr.Request = None):
            user = claim_name(state, user or None, request)  # with --auth: only the caller's own name
            guarded(service.new_conversation, state, user, simulated)
            return state, pair_summary(state)

        def api_state(state):
            return state, pair_summary(state)

        api = api_trigger.click
        api(signed_in(api_send), [session, api_text, api_num1, api_num2, api_num3, api_value], [session, api_out],
            api_name="send", concurrency_id=GENERATE_CONCURRENCY, concurrency_limit=generate_limit)
        api(signed_in(api_regenerate), [session, api_num1, api_num2, api_num3], [session, api_out],
            api_name="regenerate", concurrency_id=GENERATE_CONCURRENCY, concurrency_limit=generate_limit)
        api(signed_in(api_vote), [session, api_value], [session, api_out], api_name="vote")
        api(signed_in(api_rate), [session, api_slot, api_value], [session, api_out], api_name="rate")
        api(signed_in(api_edit), [session, api_text], [session, api_out], api_name="edit")
        api(api_new_conversation, [session, api_slot, api_flag], [session, api_out], api_name="new_conversation")
        api(signed_in(api_state), [session], [session, api_out], api_name="state")
        if dashboard is not None:
            # Every plot's series and every table, as the Dashboard tab shows them (`dashboard_data`'s dict).
            api(dashboard.data, None, api_out, api_name="dashboard")

            def api_compare(version_a: str, version_b: str):
                return dashboard.compare((version_a or "").strip(), (version_b or "").strip())

            api(api_compare, [api_slot, api_value], api_out, api_name="compare")
    demo.queue(default_concurrency_limit=4)
    return demo


# Gradio's launch asks, after its server is up, whether localhost answers, to decide that a share link is
# needed: one HEAD of the page with a 3 s timeout (gradio/networking.py url_ok), and a timeout raises
# "When localhost is not accessible, a shareable link must be created". On 2 cores busy with a training
# round or a benchmark that page took longer (9 test servers failed to start that way, 2026-12-04), and
# this app never shares. `_frontend=False` skips that check and nothing else in gradio 6.31
# (requirements.txt pins it); by then launch has already had the app's own startup answer.
SKIP_GRADIO_LOCALHOST_CHECK = {"_frontend": False}


def launch(demo: gr.Blocks, host: str, port: int, accounts: Accounts | None = None, prevent_thread_lock: bool = False,
           **kwargs) -> None:
    """Start the server with the app's CSS (Gradio 6 takes page styling at launch). With `accounts`: behind
    Gradio's login page, checked against the store's accounts, each sign-in expiring (auth.SessionTokens)."""
    kwargs = {**SKIP_GRADIO_LOCALHOST_CHECK, **kwargs}
    if accounts is None:
        demo.launch(server_name=host, server_port=port, css=CSS, prevent_thread_lock=prevent_thread_lock, **kwargs)
        return
    demo.launch(server_name=host, server_port=port, css=CSS, auth=accounts, auth_message=AUTH_MESSAGE,
                prevent_thread_lock=True, **kwargs)
    accounts.install(demo.server_app)  # Gradio makes its token table at launch; ours expires sign-ins
    if not prevent_thread_lock:
        demo.block_thread()
