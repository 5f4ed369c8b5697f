"""The driver at scale: brace expansion, set-based planning, aggregates in the done markers, a streaming
summary and a report that pages failures and samples successes. Small synthetic outputs, no model."""

from __future__ import annotations

import braceexpand
import pytest

from vidbatch.io.input_shards import expand_urls


def _expand_like_before(specs: list[str]) -> list[str]:
    """The expansion as it was written first (a list searched for each URL): the reference for order."""
    urls: list[str] = []
    for spec in specs:
        for url in braceexpand.braceexpand(spec):
            if url not in urls:
                urls.append(url)
    return urls


@pytest.mark.parametrize("specs", [
    ["data/part-{000000..000011}.tar"],
    ["a/{x,y}-{3..1}.tar", "a/x-{1..4}.tar", "a/{y,x}-2.tar"],
    ["pipe:curl -s http://h/{a,b}/s-{00..03}.tar", "pipe:curl -s http://h/a/s-{03..00}.tar"],
    ["s3://b/p/{0..2}/{0..2}.tar", "s3://b/p/1/{2..0}.tar", "plain.tar", "plain.tar"],
    ["x-{1..20..3}.tar", "x-{a..e}.tar", "x-{1..20}.tar"],
])
def test_brace_expansion_equals_the_first_implementation_in_order(specs):
    assert expand_urls(specs) == _expand_like_before(specs)
    assert expand_urls(specs[0]) == _expand_like_before(specs[:1])
