"""(1.1) Full-text search over the conversations the sender takes part in."""

from __future__ import annotations

from . import protocol as p
from .core import Context, Handler, message_out, page_of, visible_conversation
from .errors import BadRequest, NotFound
from .model import GLOBAL_ID, paged, words

MAX_QUERY_WORDS = 16


def search_messages(cmd: p.SearchMessages, ctx: Context) -> None:
    store = ctx.store
    query = list(dict.fromkeys(words(cmd.query)))
    if not query:
        raise BadRequest("query: it has no words (letters or digits)")
    if len(query) > MAX_QUERY_WORDS:
        raise BadRequest(f"query: at most {MAX_QUERY_WORDS} different words")
    if cmd.conversation_id is not None:
        scope = [visible_conversation(ctx, cmd.conversation_id).conversation_id]
    else:
        scope = [GLOBAL_ID, *(c.conversation_id for c in store.conversations_of(ctx.sender))]
    before = None
    if cmd.before_message_id is not None:
        before = store.get_message(cmd.before_message_id)
        if before is None or before.conversation_id not in scope:
            raise NotFound(f"message {cmd.before_message_id} not found")
    page, has_more = paged(store.search(scope, query, before, cmd.limit + 1), cmd.limit)
    fits = page_of(page, message_out, ctx.budget, cmd.limit)  # fewer results when they are large
    ctx.answer(
        p.SearchResults,
        p.SearchResultsData(query=cmd.query, messages=fits.views, has_more=has_more or fits.cut),
    )


HANDLERS: dict[type[p.Command], Handler] = {p.SearchMessages: search_messages}
