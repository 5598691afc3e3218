"""Test helpers shared by the data tests: a fake `urlopen` (no test touches the network) and the
one-line `DataError` check."""

import io
import urllib.error

import pytest

from data import idx


def raise_data_error(call, *args, **kwargs):
    """Runs `call`, asserts it raises a one-line DataError, returns the message."""
    with pytest.raises(idx.DataError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert message and "\n" not in message
    return message


class FakeUrlopen:
    """Stands in for urllib.request.urlopen: serves bytes or raises, by URL.

    Attributes:
        calls: the URLs requested, in order.
    """

    def __init__(self, responses):
        """`responses`: URL -> bytes to serve, or an exception instance to raise."""
        self._responses = responses
        self.calls = []

    def __call__(self, url, timeout=None):
        """Records `url`, then returns a readable response or raises."""
        assert timeout is not None, "downloads must set a timeout"
        self.calls.append(url)
        response = self._responses.get(url, urllib.error.URLError("no route to host"))
        if isinstance(response, Exception):
            raise response
        return io.BytesIO(response)


def mirror_responses(mirror, payloads):
    """URL -> bytes for every file of `payloads` (name -> bytes) on one mirror."""
    return {mirror + name: data for name, data in payloads.items()}
