"""Guards against hostile responses that img2dataset lacks, installed into its worker processes.

img2dataset (1.47) builds one `Resizer` and one `Downloader` inside `img2dataset.download` and pickles
the downloader into `spawn`ed worker processes. `guarded_img2dataset(...)` swaps both classes in
`img2dataset.main` for the subclasses below for the length of one call, so the workers run ours:

- `GuardedResizer` runs before img2dataset's decode (`cv2.imdecode`, which allocates every pixel):
  an empty body fails as "empty response body"; width and height read by PIL from the header alone
  (`Image.open`, no `.load()`) are checked against `max_image_area`; a 16-bit picture is scaled to
  8 bit (OpenCV would saturate it to 255 when it encodes the JPEG) and handed on as an 8-bit PNG.
- `GuardedDownloader` replaces `img2dataset.downloader.download_image_with_retry` in its worker with
  `download_with_deadline`: when `deadline_s` has passed, every socket of that URL's download
  (connection, headers, body, redirects, retries) is shut down, so a server trickling a byte at a
  time cannot hold a thread past it (img2dataset's `timeout` bounds each socket read only).
- `OPENCV_IO_MAX_IMAGE_PIXELS` is set to `max_image_area` for the workers (OpenCV reads it when it
  loads), so OpenCV too refuses, from the header, an oversized picture whose header PIL cannot read.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import importlib
import io
import os
import socket
import threading
import urllib.request

import cv2
import numpy as np
from img2dataset import downloader as i2d_downloader
from img2dataset.downloader import Downloader
from img2dataset.resizer import Resizer
from PIL import Image

EMPTY_BODY = "empty response body"
DEADLINE_EXCEEDED = "deadline exceeded"
AREA_TOO_LARGE = "image area too large"
OPENCV_PIXEL_LIMIT = "OPENCV_IO_MAX_IMAGE_PIXELS"


@contextlib.contextmanager
def guarded_img2dataset(max_image_area: float | None, deadline_s: float):
    """Inside, `img2dataset.download` builds the guarded resizer and downloader, and the worker
    processes it starts inherit OpenCV's pixel limit."""
    main = importlib.import_module("img2dataset.main")  # `img2dataset.main` is also a function's name

    saved = main.Resizer, main.Downloader, os.environ.get(OPENCV_PIXEL_LIMIT)
    main.Resizer = GuardedResizer  # it gets max_image_area from img2dataset.download itself
    main.Downloader = functools.partial(GuardedDownloader, deadline_s=deadline_s)
    if max_image_area is not None:
        os.environ[OPENCV_PIXEL_LIMIT] = str(min(int(max_image_area), 2**62))
    try:
        yield
    finally:
        main.Resizer, main.Downloader = saved[0], saved[1]
        if saved[2] is None:
            os.environ.pop(OPENCV_PIXEL_LIMIT, None)
        else:
            os.environ[OPENCV_PIXEL_LIMIT] = saved[2]


class GuardedResizer(Resizer):
    """img2dataset's resizer behind three checks that need no decoded pixels."""

    def __call__(self, img_stream, blurring_bbox_list=None):
        refusal, stream = self._guard(img_stream)
        if refusal is not None:
            return None, None, None, None, None, refusal
        return super().__call__(stream, blurring_bbox_list)

    def _guard(self, stream: io.BytesIO) -> tuple[str | None, io.BytesIO]:
        if stream.seek(0, io.SEEK_END) == 0:
            return EMPTY_BODY, stream
        header = _header(stream)
        stream.seek(0)
        if header is None:  # not a format PIL knows: OpenCV decides (its pixel limit still holds)
            return None, stream
        (width, height), is_16_bit = header
        if width * height > self.max_image_area:
            return (
                f"{AREA_TOO_LARGE}: {width} x {height} pixels in the header (not decoded), "
                f"more than max_image_area {self.max_image_area:g}"
            ), stream
        if is_16_bit:
            return None, _to_8_bit(stream)
        return None, stream


def header_refusal(data: bytes, max_image_area: float | None) -> str | None:
    """Why a picture's bytes are refused before any pixel is decoded (empty, no header PIL can
    read, more pixels than `max_image_area` in the header), or None. For pictures that come from
    outside other than through img2dataset (the search server's uploads)."""
    if not data:
        return EMPTY_BODY
    header = _header(io.BytesIO(data))
    if header is None:
        return "not a picture (no image header PIL can read)"
    (width, height), _ = header
    if max_image_area is not None and width * height > max_image_area:
        return f"{AREA_TOO_LARGE}: {width} x {height} pixels in the header, more than {max_image_area:g}"
    return None


def _header(stream: io.BytesIO) -> tuple[tuple[int, int], bool] | None:
    """(size, has 16-bit samples) from the image header; PIL decodes no pixel until `.load()`."""
    stream.seek(0)
    try:
        with Image.open(stream) as image:
            return image.size, any(";16" in _raw_mode(tile[3]) for tile in image.tile)
    except Exception:  # any unreadable header: img2dataset's decoder reports it
        return None


def _raw_mode(args) -> str:
    """The decoder's raw mode of a PIL tile: 'I;16B' (PNG), ('RGB;16N', ...) (TIFF), 'RGB', ..."""
    first = args[0] if isinstance(args, tuple) and args else args
    return first if isinstance(first, str) else ""


def _to_8_bit(stream: io.BytesIO) -> io.BytesIO:
    """The picture with 16-bit samples scaled to 8 bit, as a PNG (channels and alpha kept)."""
    pixels = cv2.imdecode(np.frombuffer(stream.getvalue(), np.uint8), cv2.IMREAD_UNCHANGED)
    stream.seek(0)
    if pixels is None or pixels.dtype != np.uint16:
        return stream
    scaled = ((pixels.astype(np.uint32) + 128) // 257).astype(np.uint8)  # 0 -> 0, 65535 -> 255
    ok, encoded = cv2.imencode(".png", scaled)
    return io.BytesIO(encoded.tobytes()) if ok else stream


class GuardedDownloader(Downloader):
    """img2dataset's downloader whose worker gives each URL a total deadline."""

    def __init__(self, *args, deadline_s: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.deadline_s = deadline_s

    def __call__(self, row):
        _prepare_worker(self.deadline_s)  # runs in the worker process, before its shard
        return super().__call__(row)


def _prepare_worker(deadline_s: float) -> None:
    Image.MAX_IMAGE_PIXELS = None  # PIL's own bomb check is replaced by max_image_area above
    urllib.request.install_opener(_watched_opener())
    guarded = functools.partial(download_with_deadline, deadline_s=deadline_s)
    i2d_downloader.download_image_with_retry = guarded  # looked up by name for every URL


def download_with_deadline(
    row, timeout, retries, user_agent_token, disallowed_header_directives, deadline_s: float
):
    """img2dataset's `download_image_with_retry` with one deadline over all attempts of one URL."""
    deadline = _Deadline(deadline_s)
    _current.deadline = deadline
    try:
        for _ in range(retries + 1):
            key, stream, error = i2d_downloader.download_image(
                row, timeout, user_agent_token, disallowed_header_directives
            )
            if stream is not None or deadline.expired:
                break
    finally:
        _current.deadline = None
        deadline.finish()
    if deadline.expired:  # a body cut short by the deadline may look complete: never keep it
        if stream is not None:
            stream.close()
        return key, None, f"{DEADLINE_EXCEEDED}: no complete response within deadline_s={deadline_s:g} s"
    return key, stream, error


_current = threading.local()  # the deadline of the download running in this thread


class _Deadline:
    """Shuts down the sockets registered with it when `seconds` have passed, unless finished."""

    def __init__(self, seconds: float) -> None:
        self.expired = False
        self._finished = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def add(self, sock: socket.socket) -> None:
        # a duplicate descriptor: TLS detaches the original socket object, the connection stays
        dup = sock.dup()
        with self._lock:
            self._sockets.append(dup)
            if self.expired:
                _shut_down(dup)

    def _expire(self) -> None:
        with self._lock:
            if self._finished:
                return
            self.expired = True
            for sock in self._sockets:
                _shut_down(sock)  # a thread blocked in recv on this connection wakes up with EOF

    def finish(self) -> None:
        self._timer.cancel()
        with self._lock:
            self._finished = True
            for sock in self._sockets:
                sock.close()
            self._sockets.clear()


def _shut_down(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def _watched_create_connection(*args, **kwargs) -> socket.socket:
    sock = socket.create_connection(*args, **kwargs)
    deadline = getattr(_current, "deadline", None)
    if deadline is not None:
        deadline.add(sock)
    return sock


class _WatchedHTTPConnection(http.client.HTTPConnection):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._create_connection = _watched_create_connection  # http.client's hook for the TCP socket


class _WatchedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._create_connection = _watched_create_connection


class _WatchedHTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req):
        return self.do_open(_WatchedHTTPConnection, req)


class _WatchedHTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req):
        return self.do_open(_WatchedHTTPSConnection, req, context=self._context)


@functools.cache
def _watched_opener() -> urllib.request.OpenerDirector:
    """urllib's default opener (proxies, redirects, ...) with connections the deadline can cut."""
    return urllib.request.build_opener(_WatchedHTTPHandler, _WatchedHTTPSHandler)
