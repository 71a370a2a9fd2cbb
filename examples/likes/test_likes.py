"""The sample app's tests. The same tests run on the in-memory backends,

    pytest examples/likes --sc-backend memory      (no Java, emulator or memcached)

and, unchanged, on the real emulators and memcached (once per engine):

    pytest examples/likes
"""

from __future__ import annotations

import threading
import time
from typing import Any

import likes


def test_likes_count_once_per_request(sharded_counter_env: Any) -> None:
    assert likes.like("p1", "ann", request_id="r1")
    assert likes.like("p1", "bob", request_id="r2")
    assert likes.like("p1", "bob", request_id="r2")  # a retried request
    assert likes.likes("p1") == 2
    assert likes.likes("p1", exact=True) == 2


def test_a_user_may_like_five_times_a_minute(sharded_counter_env: Any) -> None:
    allowed = [likes.like("p2", "eve", request_id=f"e{n}") for n in range(7)]
    assert allowed == [True] * 5 + [False] * 2
    assert likes.likes("p2", exact=True) == 5


def test_many_threads_liking_one_post_lose_nothing(sharded_counter_env: Any) -> None:
    def fan(user: int) -> None:
        for n in range(5):
            likes.like("hot", f"u{user}", request_id=f"u{user}-{n}")

    threads = [threading.Thread(target=fan, args=(user,)) for user in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert likes.likes("hot", exact=True) == 40
    assert likes.likes("hot") == 40


def test_a_flight_is_never_overbooked(sharded_counter_env: Any) -> None:
    booked = [likes.book("LH1", 2, capacity=5) for _ in range(4)]
    assert booked == [True, True, False, False]
    assert likes.book("LH1", 1, capacity=5)
    assert not likes.book("LH1", 1, capacity=5)


def test_views_are_summed_over_the_last_hour(sharded_counter_env: Any) -> None:
    now = time.time()
    for seconds_ago in (10, 70, 1800, 7200):
        likes.view("/home", at=now - seconds_ago)
    assert likes.views_last_hour("/home") == 3
