import urllib.error

import pytest

from denseforge.stages import url_screen
from denseforge.stages.url_screen import BlockedAddressError, guarded_opener, screen_url


@pytest.mark.parametrize(
    "url, reason",
    [
        (None, "missing_url"),
        ("", "missing_url"),
        ("   ", "missing_url"),
        (float("nan"), "missing_url"),
        (42, "invalid_url"),
        ("ftp://example.com/a.jpg", "unsupported_scheme"),
        ("file:///etc/passwd", "unsupported_scheme"),
        ("javascript:alert(1)", "unsupported_scheme"),
        ("example.com/a.jpg", "unsupported_scheme"),
        ("http://", "invalid_url"),
        ("http://exa mple.com/a.jpg", "invalid_url"),
        ("http://example.com:99999/a", "invalid_url"),
        ("http://127.0.0.1/a.jpg", "private_address"),
        ("http://localhost:8000/a.jpg", "private_address"),
        ("http://10.1.2.3/a.jpg", "private_address"),
        ("http://169.254.169.254/latest/meta-data", "private_address"),
        ("http://[::1]/a.jpg", "private_address"),
        ("http://224.0.0.1/a.jpg", "private_address"),
        ("http://[::ffff:192.168.0.1]/a.jpg", "private_address"),
    ],
)
def test_screen_rejects_with_reason(url, reason):
    result = screen_url(url)
    assert result is not None and result.reason == reason


def test_screen_accepts_public_and_allowed_private():
    assert screen_url("https://example.com/cat.jpg?x=1") is None
    assert screen_url("http://93.184.216.34/a.png") is None
    assert screen_url("http://127.0.0.1:8000/a.jpg", allow_private=True) is None


def test_opener_refuses_loopback_unless_allowed(photo_server):
    url = f"{photo_server.base_url}/img/coffee.jpg"
    with pytest.raises(urllib.error.URLError) as err:
        guarded_opener(allow_private=False, max_bytes=10**8).open(url, timeout=5)
    assert isinstance(err.value.reason, BlockedAddressError)
    body = guarded_opener(allow_private=True, max_bytes=10**8).open(url, timeout=5).read()
    assert body[:2] == b"\xff\xd8"


def test_opener_refuses_private_target_behind_a_redirect(photo_server, monkeypatch):
    # Pretend 127.0.0.1 is public and 127.0.0.2 is private: the first hop passes, the redirect must not.
    monkeypatch.setattr(url_screen, "is_public_address", lambda address: address == "127.0.0.1")
    opener = guarded_opener(allow_private=False, max_bytes=10**8)
    direct = f"{photo_server.base_url}/img/coffee.jpg"
    assert opener.open(direct, timeout=5).read()[:2] == b"\xff\xd8"
    hidden = f"http://127.0.0.2:{photo_server.port}/img/coffee.jpg"
    with pytest.raises(urllib.error.URLError) as err:
        opener.open(f"{photo_server.base_url}/redirect?to={hidden}", timeout=5)
    assert "private_address" in str(err.value.reason)


def test_opener_caps_response_size(photo_server):
    opener = guarded_opener(allow_private=True, max_bytes=2048)
    with pytest.raises(url_screen.ResponseTooLargeError, match="too_large"):
        opener.open(f"{photo_server.base_url}/img/coffee.jpg", timeout=5).read()


@pytest.mark.parametrize(
    "address",
    [
        "::7f00:1",
        "64:ff9b::7f00:1",
        "2002:7f00:1::",
        "::ffff:0:7f00:1",
        "64:ff9b:1::a00:1",
        "2001:0:4136:e378:8000:63bf:80ff:fffe",
    ],
)
def test_ipv6_forms_that_embed_a_private_ipv4_are_private(address):
    # compatible, NAT64, 6to4, translated, local-use NAT64, Teredo (client 127.0.0.1)
    assert not url_screen.is_public_address(address)
    assert screen_url(f"http://[{address}]/a.jpg").reason == "private_address"


def test_ipv6_forms_that_embed_a_public_ipv4_stay_public():
    for address in ("64:ff9b::808:808", "2002:808:808::", "2001:4860:4860::8888"):
        assert url_screen.is_public_address(address)


def test_a_dripping_server_is_cut_off_at_the_download_deadline(photo_server):
    import time

    opener = guarded_opener(allow_private=True, max_bytes=10**8, deadline_s=1.0)
    start = time.monotonic()
    with pytest.raises(url_screen.DownloadDeadlineError, match=r"\[timeout\].*deadline of 1 s"):
        # 12 bytes every 0.2 s for 100 times: each read is well within the socket timeout of 5 s
        opener.open(f"{photo_server.base_url}/drip?bytes=12&every=0.2&times=100", timeout=5).read()
    assert time.monotonic() - start < 2.5


def test_the_size_cap_holds_without_a_content_length(photo_server):
    opener = guarded_opener(allow_private=True, max_bytes=2048)
    with pytest.raises(url_screen.ResponseTooLargeError, match="too_large"):
        opener.open(f"{photo_server.base_url}/drip?bytes=1000&every=0&times=10", timeout=5).read()
    body = (
        guarded_opener(allow_private=True, max_bytes=2048)
        .open(f"{photo_server.base_url}/drip?bytes=1000&every=0&times=2", timeout=5)
        .read()
    )
    assert body == b"\xff" * 2000
