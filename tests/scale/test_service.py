"""The HTTP side of mmsep-serve without Ray: what is a form request, and a body that stalls."""

import asyncio

import pytest

from mmsep.scale.service import HttpError, check_form_request, read_limited_body


@pytest.mark.parametrize("content_type, query, status", [
    ("multipart/form-data; boundary=x", "", None),
    ("application/x-www-form-urlencoded", "", None),
    ("Multipart/Form-Data; boundary=x", "", None),
    ("application/json", "", 415),
    (None, "", 415),
    ("multipart/form-data; boundary=x", "text=dog", 400),
])
def test_only_forms_without_a_query_string_are_requests(content_type, query, status):
    if status is None:
        check_form_request(content_type, query)
        return
    with pytest.raises(HttpError) as refused:
        check_form_request(content_type, query)
    assert refused.value.status == status


class _Request:
    """What read_limited_body reads of a Starlette request: headers and the body stream."""

    def __init__(self, chunks, stall_after: int | None = None):
        self.headers, self._chunks, self._stall_after = {}, chunks, stall_after

    async def stream(self):
        for i, chunk in enumerate(self._chunks):
            if i == self._stall_after:
                await asyncio.sleep(3600)  # a client that stops sending
            yield chunk


def test_a_body_is_read_whole_and_a_stalled_one_is_given_up():
    whole = asyncio.run(read_limited_body(_Request([b"ab", b"cd"]), 10, idle_seconds=1.0))
    assert whole == b"abcd"
    with pytest.raises(HttpError) as stalled:
        asyncio.run(read_limited_body(_Request([b"ab", b"cd"], stall_after=1), 10,
                                      idle_seconds=0.05))
    assert stalled.value.status == 408 and "stalled" in str(stalled.value)
    with pytest.raises(HttpError) as large:
        asyncio.run(read_limited_body(_Request([b"abcdef", b"ghijkl"]), 10))
    assert large.value.status == 413
