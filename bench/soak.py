"""Soak: the real ``ai-platform serve`` on a real model under hours-like mixed traffic, for ``--minutes``.

Starts ``.venv/bin/ai-platform serve [--workers N]`` in a throwaway folder (its own ``.env``:
keys, SQLite usage database, logs, every operation mapped to the model, a small
``PREFIX_CACHE_MB`` that evicts constantly) under glibc's heap checks (``MALLOC_CHECK_=3``,
``MALLOC_PERTURB_``, and ``libc_malloc_debug.so`` preloaded where glibc needs it for them), and
drives it with:

- the built-in ``summarize``, ``translate``, ``classify`` and the third-party ``sentiment``;
- phases of 1, 4, 16, 4 concurrent clients (cycling), each followed by an idle gap once
  every answer is in, so the model's decode batch empties and grows again;
- inputs from a few characters up to each operation's ``max_input_chars`` (``GET /limits``),
  classify with 2 to 50 categories (multi-token, non-ASCII, up to 100 characters), translate
  between several languages, summarize with 1 to 20 sentences; a few invalid requests (422);
- clients that close their connection mid-generation (their own key, counted apart);
- an admin changing daily limits (``PUT /limits``, always far above the traffic) and
  reading ``/limits``, ``/limits/usage``, ``/usage/keys``, ``/health`` now and then.

At the end it prints requests by operation and status, disconnects, crashes (the server
exiting, a worker process dying or respawned, heap-check messages in its output), 5xx other
than 503, the server's RSS (whole process tree) after the first cycle and at the end,
whether the usage counters equal the 200s the client saw (exactly, per key and operation),
and p50/p99 latency per operation. Exits 1 if there was a crash, an unexpected 5xx, a
transport error, a 200 whose body breaks the contract, a counter mismatch, an ERROR or CRITICAL
line in the server's output, the RSS at the end more than ``--max-rss-growth`` (10%) above the
RSS after warm-up, or a peak RSS over ``--max-peak-mb``.

    .venv/bin/python bench/soak.py --minutes 30 [--workers 2] [--json soak.json]
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import math
import os
import random
import re
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
from _server import ROOT, start_server

DEMO_MODEL = ROOT / "models" / "smollm2-135m-instruct"
OPERATIONS = ("summarize", "translate", "classify", "sentiment")
WEIGHTS = (0.3, 0.15, 0.3, 0.25)  # translate answers are the longest
FALLBACK_MAX_CHARS = {"summarize": 8000, "translate": 4000, "classify": 2000, "sentiment": 2000}
CLIENT_KEY = "soak-client-key-0123456789"
DISCONNECT_KEY = "soak-disconnect-key-0123456789"  # requests that hang up: their usage is checked apart
ADMIN_KEY = "soak-admin-key-0123456789"
DAILY_LIMIT = 100_000_000  # PUT /limits picks values between this and 1e9: no valid request is refused
MB = 2**20

# Server output that means a process died or glibc found a damaged heap.
CRASH_PATTERNS = re.compile(
    r"Child process \[\d+\] died|model \S+: its process|malloc\(\)|free\(\)|realloc\(\)|double free|corrupted|munmap_chunk|"
    r"malloc_consolidate|Segmentation fault|Fatal Python error|core dumped|Aborted"
)
DEATH_LINE = re.compile(r"Child process \[\d+\] died|model \S+: its process")
ERROR_LINE = re.compile(r" (ERROR|CRITICAL) ")

SENTENCES = {
    "en": (
        "The city council met on Tuesday to discuss the new bus routes.",
        "Residents asked for more evening services and for a stop near the hospital.",
        "Our team moved the billing system to the new servers over the weekend.",
        "Two invoices were sent twice; both customers were refunded on Monday.",
        "The library will close for renovation from June to August.",
        "Sales of the new phone were lower than expected in the first quarter.",
        "My internet connection keeps dropping and the router shows a red light.",
        "Please contact jane.doe@example.com or call +1 415 555 0134 before Friday.",
        "The quarterly earnings report exceeded all analyst expectations.",
        "Heavy rain is expected in the north, with temperatures around 12°C.",
        "I ordered a blue jacket three weeks ago and it still has not arrived!",
        "The new release fixes a memory leak in the scheduler and speeds up start-up by 40%.",
        "Why does the app ask for my password every single time I open it?",
        "Thanks a lot, the support agent solved my problem in five minutes.",
        "The museum's café serves crème brûlée, naïve art posters hang on the walls.",
        "Researchers found that the vaccine was 91.3% effective in the trial.",
        "Train services between the two cities will be reduced during the strike.",
        "The recipe needs two cups of flour, one egg and a pinch of salt.",
        "Our CEO, Dr. A. Smith, will speak at 9 a.m. — be on time.",
        "Error 0x80070005: access denied when installing the update.",
        "Customers in Tokyo (東京) and Cairo (القاهرة) can now pay by card.",
        "The football match ended in a draw after extra time.",
        "Invoices older than ninety days are archived automatically.",
        "I love this product 😀 but the battery dies too fast.",
    ),
    "fr": (
        "Le conseil municipal s'est réuni mardi pour discuter des nouvelles lignes de bus.",
        "La bibliothèque fermera pour travaux de juin à août.",
        "Mon colis n'est toujours pas arrivé après trois semaines.",
        "Les ventes du nouveau téléphone ont été plus faibles que prévu.",
    ),
    "de": (
        "Der Stadtrat hat am Dienstag über die neuen Buslinien gesprochen.",
        "Die Bibliothek bleibt von Juni bis August wegen Renovierung geschlossen.",
        "Meine Internetverbindung bricht ständig ab.",
        "Die Rechnung wurde zweimal verschickt.",
    ),
    "es": (
        "El ayuntamiento se reunió el martes para hablar de las nuevas rutas de autobús.",
        "La biblioteca cerrará por obras de junio a agosto.",
        "Mi conexión a internet se corta constantemente.",
        "Las ventas del nuevo teléfono fueron más bajas de lo esperado.",
    ),
}
TINY_TEXTS = ("Hi.", "ok", "Great!", "Refund?", "No.", "Why?", "¡Hola!", "Merci.", "404", "Terrible service.")
TRANSLATE_PAIRS = (
    ("en", "fr"), ("en", "ar"), ("en", "de"), ("en", "es"), ("en", "zh"), ("en", "ja"), ("en", "ru"),
    ("en", "pt-BR"), ("fr", "en"), ("de", "en"), ("es", "en"), ("es", "pt-BR"), ("de", "fr"),
)  # fmt: skip
SUMMARY_LANGUAGES = ("en", "en", "en", "en", "fr", "de", "es", "ar", "zh")
LABELS = (
    "billing", "sales", "spam", "urgent", "refund", "weather", "sports", "politics", "health", "travel",
    "music", "cooking", "finance", "science", "legal", "other", "technical_support", "general_inquiry",
    "account access problem", "request for a refund", "complaint about a late delivery",
    "praise for customer service", "question about pricing", "bug report", "feature request",
    "security incident", "change of address", "cancel subscription", "product recommendation",
    "shipping and delivery", "human resources", "out of office reply", "facturación", "soporte técnico",
    "Lieferung", "réclamation", "فاتورة", "技术支持", "配送", "positive feedback", "negative feedback",
    "neutral statement", "public transport", "education", "real estate", "entertainment", "energy",
    "agriculture", "cybersecurity", "hardware failure", "software installation", "password reset",
    "a detailed question about how the annual enterprise licence is priced when more than fifty seats ar",
)  # fmt: skip
LABEL_COUNTS = (2, 2, 3, 3, 4, 4, 4, 5, 6, 8, 10, 16, 25, 50)
SENTIMENTS = ("positive", "negative", "neutral")


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile (``fraction`` in 0..1); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(fraction * len(ordered)) - 1))]


class Traffic:
    """Random request bodies for every operation, within (or, for invalid ones, just past) its limits."""

    def __init__(self, rng: random.Random, max_chars: dict[str, int], long_fraction: float) -> None:
        self.rng = rng
        self.max_chars = max_chars
        self.long_fraction = long_fraction
        self.sequence = 0

    def text(self, limit: int, language: str = "en") -> str:
        """A text of a few characters up to ``limit`` (log-uniform, some right at the limit)."""
        rng = self.rng
        roll = rng.random()
        if roll < 0.12:
            return rng.choice(TINY_TEXTS)[:limit]
        if roll < 0.12 + self.long_fraction:
            length = limit - rng.randrange(0, 4)
        else:
            length = int(math.exp(rng.uniform(math.log(20), math.log(limit / 2))))
        return self.text_of(length, language)

    def text_of(self, length: int, language: str = "en") -> str:
        pool = SENTENCES[language]
        parts: list[str] = []
        size = 0
        while size < length:
            sentence = self.rng.choice(pool)
            parts.append(sentence)
            size += len(sentence) + 1
        text = " ".join(parts)[:length].strip()
        return text or "Hello."

    def request(self, operation: str) -> tuple[dict[str, Any], bool]:
        """(body, valid): about 3% are invalid in one field and must get 422."""
        rng = self.rng
        if rng.random() < 0.03:
            return self.invalid(operation), False
        body: dict[str, Any]
        limit = self.max_chars[operation]
        if operation == "summarize":
            sentences = rng.choice((1, 1, 2, 2, 3, 3, 3, 4, 5, 8, 12, 20))
            body = {"text": self.text(limit), "max_sentences": sentences}
            if rng.random() < 0.7:
                body["language"] = rng.choice(SUMMARY_LANGUAGES)
        elif operation == "translate":
            source, target = rng.choice(TRANSLATE_PAIRS)
            body = {"text": self.text(limit, source), "source_language": source, "target_language": target}
        elif operation == "classify":
            count = rng.choice(LABEL_COUNTS)
            body = {"text": self.text(limit), "categories": rng.sample(LABELS, count)}
        else:
            body = {"text": self.text(limit)}
        if rng.random() < 0.5:
            self.sequence += 1
            body["request_id"] = f"soak-{operation}-{self.sequence}"
        return body, True

    def invalid(self, operation: str) -> dict[str, Any]:
        rng = self.rng
        too_long = self.text_of(self.max_chars[operation] + 1)
        too_long = too_long + "x" * (self.max_chars[operation] + 1 - len(too_long))
        if operation == "summarize":
            return rng.choice(({"text": too_long}, {"text": "Hello there.", "max_sentences": rng.choice((0, 21))}))
        if operation == "translate":
            return rng.choice(
                (
                    {"text": too_long, "source_language": "en", "target_language": "fr"},
                    {"text": "Hello.", "source_language": "english", "target_language": "fr"},
                )
            )
        if operation == "classify":
            return rng.choice(
                (
                    {"text": too_long, "categories": ["a", "b"]},
                    {"text": "Hello.", "categories": ["billing", "billing"]},
                    {"text": "Hello.", "categories": ["billing"]},
                )
            )
        return rng.choice(({"text": too_long}, {"text": "Hello.", "labels": ["x", "y"]}))


def contract_problem(operation: str, body: dict[str, Any], answer: Any) -> str | None:
    """What is wrong with a 200 answer, or None: labels among the choices, scores a distribution, echoes."""
    try:
        meta = answer["meta"]
        if meta["operation"] != operation:
            return f"meta.operation {meta['operation']!r}"
        if "request_id" in body and meta["request_id"] != body["request_id"]:
            return f"meta.request_id {meta['request_id']!r} for {body['request_id']!r}"
        if operation in ("classify", "sentiment"):
            choices = body["categories"] if operation == "classify" else SENTIMENTS
            label = answer["label"] if operation == "classify" else answer["sentiment"]
            scores = answer["scores"]
            if label not in choices or set(scores) != set(choices):
                return f"label {label!r} / scores {sorted(scores)} not the choices"
            total = sum(scores.values())
            if not all(math.isfinite(s) and 0 <= s <= 1 for s in scores.values()) or abs(total - 1) > 1e-3:
                return f"scores not a distribution (sum {total})"
            if abs(answer["confidence"] - scores[label]) > 1e-6:
                return "confidence != scores[label]"
        elif operation == "summarize":
            if not 0 <= answer["sentence_count"] <= body.get("max_sentences", 3):
                return f"sentence_count {answer['sentence_count']}"
            if not isinstance(answer["summary"], str):
                return "summary not a string"
        elif operation == "translate":
            if (answer["source_language"], answer["target_language"]) != (
                body["source_language"],
                body["target_language"],
            ):
                return "languages not echoed"
            if not isinstance(answer["translated_text"], str):
                return "translated_text not a string"
    except (KeyError, TypeError) as exc:
        return f"missing or malformed field: {exc!r}"
    return None


@dataclass
class Stats:
    statuses: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    invalid_statuses: Counter[str] = field(default_factory=Counter)  # requests built to be invalid
    unexpected_5xx: list[dict[str, Any]] = field(default_factory=list)
    transport_errors: list[dict[str, Any]] = field(default_factory=list)
    bad_bodies: list[dict[str, Any]] = field(default_factory=list)
    disconnects: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    admin: Counter[str] = field(default_factory=Counter)
    output_tokens: int = 0

    def ok_count(self, operation: str) -> int:
        return self.statuses[operation]["200"]


class Soak:
    def __init__(self, args: argparse.Namespace, port: int, server: Any, folder: Path) -> None:
        self.args = args
        self.port = port
        self.server = server
        self.folder = folder
        self.rng = random.Random(args.seed)
        self.stats = Stats()
        self.stop = asyncio.Event()
        self.stopping = False  # set before shutdown: process exits after it are not crashes
        self.started = time.monotonic()
        self.phases: list[dict[str, Any]] = []
        self.idle_rss: list[tuple[float, float]] = []
        self.peak_rss_mb = 0.0
        self.process_deaths: list[dict[str, Any]] = []
        self.server_exit: int | None = None
        self.known_processes: dict[int, str] = {}
        self.client = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}",
            timeout=httpx.Timeout(900, connect=30),
            # Below uvicorn's 5 s keep-alive: never reuse a connection the server is closing.
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=32, keepalive_expiry=2),
        )
        self.traffic: Traffic | None = None

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    # --- the server process ---------------------------------------------------------------------------

    def tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.server.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def rss_mb(self) -> float:
        total = 0
        for process in self.tree():
            with suppress(psutil.Error):
                total += process.memory_info().rss
        return total / MB

    def processes(self) -> dict[int, str]:
        """pid -> role of every process under the server: uvicorn's workers, the model processes, helpers."""
        found: dict[int, str] = {}
        with suppress(psutil.Error):
            root = psutil.Process(self.server.pid)
            for child in root.children(recursive=True):
                with suppress(psutil.Error):
                    command = " ".join(child.cmdline())
                    if "resource_tracker" in command or "spawn_main" not in command:
                        continue  # not a worker or a model: multiprocessing's helpers
                    worker = self.args.workers > 1 and child.ppid() == root.pid
                    found[child.pid] = "uvicorn worker" if worker else "model process"
        return found

    async def monitor(self) -> None:
        """Every 0.5 s: did the server exit, did a worker or model process disappear; the tree's RSS for the peak."""
        while True:
            code = self.server.poll()
            if code is not None:
                if not self.stopping:
                    self.server_exit = code
                    print(f"\n!! server exited with code {code} at {self.elapsed():.0f} s", flush=True)
                    self.stop.set()
                return
            if not self.stopping:
                current = self.processes()
                for pid, role in self.known_processes.items():
                    if pid not in current:
                        self.process_deaths.append({"pid": pid, "role": role, "at_s": round(self.elapsed(), 1)})
                        print(f"\n!! {role} {pid} died at {self.elapsed():.0f} s", flush=True)
                self.known_processes = current
                self.peak_rss_mb = max(self.peak_rss_mb, self.rss_mb())
            await asyncio.sleep(0.5)

    def scan_logs(self) -> tuple[list[str], list[str]]:
        """(crash lines, ERROR/CRITICAL lines) in the server's output (its console log and every process's stderr)."""
        crash, errors = [], []
        path = self.folder / "server.out"
        for line in path.read_text(errors="replace").splitlines() if path.is_file() else []:
            if CRASH_PATTERNS.search(line):
                crash.append(line.rstrip())
            elif ERROR_LINE.search(line):
                errors.append(line.rstrip())
        return crash, errors

    # --- traffic ------------------------------------------------------------------------------------------

    def pick_operation(self) -> str:
        return self.rng.choices(OPERATIONS, self.args.weights)[0]

    async def one_request(self, operation: str | None = None) -> None:
        assert self.traffic is not None
        operation = operation or self.pick_operation()
        body, valid = self.traffic.request(operation)
        sent = time.perf_counter()
        try:
            response = await self.client.post(f"/operations/{operation}", json=body, headers={"X-API-Key": CLIENT_KEY})
        except httpx.TransportError as exc:
            self.stats.statuses[operation]["transport_error"] += 1
            self.stats.transport_errors.append(
                {"operation": operation, "error": repr(exc), "at_s": round(self.elapsed(), 1)}
            )
            return
        elapsed = time.perf_counter() - sent
        status = response.status_code
        self.stats.statuses[operation][str(status)] += 1
        if not valid:
            self.stats.invalid_statuses[str(status)] += 1
        if status >= 500 and status != 503:
            self.stats.unexpected_5xx.append(
                {
                    "operation": operation,
                    "status": status,
                    "body": response.text[:500],
                    "at_s": round(self.elapsed(), 1),
                }
            )
        if status == 200:
            self.stats.latencies[operation].append(elapsed)
            answer = response.json()
            with suppress(KeyError, TypeError, ValueError):
                self.stats.output_tokens += int(answer["meta"]["output_tokens"])
            problem = contract_problem(operation, body, answer) if valid else "an invalid request got 200"
            if problem:
                self.stats.bad_bodies.append({"operation": operation, "problem": problem, "answer": str(answer)[:300]})

    async def client_loop(self, until: float) -> None:
        while time.monotonic() < until and not self.stop.is_set():
            await self.one_request()

    async def disconnect_once(self) -> None:
        """A valid request on a raw connection, closed after a random short delay unless answered first."""
        assert self.traffic is not None
        operation = self.pick_operation()
        body, valid = self.traffic.request(operation)
        while not valid:
            body, valid = self.traffic.request(operation)
        payload = json.dumps(body).encode()
        head = (
            f"POST /operations/{operation} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
            f"Content-Type: application/json\r\nX-API-Key: {DISCONNECT_KEY}\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
        ).encode()
        counts = self.stats.disconnects[operation]
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            counts["connect_error"] += 1
            return
        try:
            writer.write(head + payload)
            await writer.drain()
            try:
                line = await asyncio.wait_for(reader.readline(), self.rng.uniform(0.05, 1.5))
            except TimeoutError:
                counts["closed_mid_request"] += 1
                return
            parts = line.split()
            status = parts[1].decode() if len(parts) > 1 else "no_response"
            counts[f"answered_{status}"] += 1
            if status.isdigit() and int(status) >= 500 and status != "503":
                self.stats.unexpected_5xx.append(
                    {"operation": operation, "status": int(status), "body": "(disconnect client)", "at_s": 0}
                )
        except OSError:
            counts["closed_mid_request"] += 1
        finally:
            writer.close()
            with suppress(OSError):
                await writer.wait_closed()

    async def disconnect_loop(self, until: float) -> None:
        while not self.stop.is_set():
            await asyncio.sleep(self.rng.uniform(0.3, 2.5))
            if time.monotonic() >= until:
                return
            await self.disconnect_once()

    async def admin_once(self) -> None:
        """A PUT /limits far above the traffic, or one of the read endpoints."""
        roll = self.rng.random()
        admin, client = {"X-API-Key": ADMIN_KEY}, {"X-API-Key": CLIENT_KEY}
        try:
            if roll < 0.5:
                operation = self.rng.choice(OPERATIONS)
                limit = self.rng.randrange(DAILY_LIMIT, 1_000_000_000)
                response = await self.client.put(
                    "/limits", json={"operation": operation, "daily_limit": limit}, headers=admin
                )
                name = "PUT /limits"
                if response.status_code == 200 and response.json().get("daily_limit") != limit:
                    self.stats.admin["PUT /limits not applied"] += 1
            else:
                name, headers = self.rng.choice(
                    (("/limits", client), ("/limits/usage", client), ("/usage/keys", admin), ("/health", {}))
                )
                response = await self.client.get(name, headers=headers)
                name = f"GET {name}"
        except httpx.TransportError as exc:
            self.stats.transport_errors.append(
                {"operation": "admin", "error": repr(exc), "at_s": round(self.elapsed(), 1)}
            )
            return
        self.stats.admin[f"{name} {response.status_code}"] += 1
        if response.status_code >= 500 and response.status_code != 503:
            self.stats.unexpected_5xx.append(
                {"operation": name, "status": response.status_code, "body": response.text[:500], "at_s": 0}
            )

    async def admin_loop(self, until: float) -> None:
        while not self.stop.is_set():
            await asyncio.sleep(self.rng.uniform(1.0, 5.0))
            if time.monotonic() >= until:
                return
            await self.admin_once()

    async def phase(self, clients: int, seconds: float) -> None:
        started = time.monotonic()
        until = started + seconds
        before = sum(sum(c.values()) for c in self.stats.statuses.values())
        await asyncio.gather(
            *(self.client_loop(until) for _ in range(clients)), self.disconnect_loop(until), self.admin_loop(until)
        )
        done = time.monotonic()
        requests = sum(sum(c.values()) for c in self.stats.statuses.values()) - before
        self.phases.append(
            {
                "clients": clients,
                "seconds": round(done - started, 1),
                "drain_s": round(done - until, 1),
                "requests": requests,
            }
        )
        print(
            f"[{self.elapsed():6.0f} s] {clients:2d} clients: {requests} requests in {done - started:.0f} s "
            f"(last answer {max(0.0, done - until):.0f} s after the phase)",
            flush=True,
        )

    async def usage(self, key: str) -> dict[str, int]:
        response = await self.client.get("/usage/keys/me", headers={"X-API-Key": key})
        response.raise_for_status()
        return {row["operation"]: row["request_count"] for row in response.json()["usage"]}

    async def operation_usage(self) -> tuple[dict[str, int], str]:
        response = await self.client.get("/limits/usage", headers={"X-API-Key": CLIENT_KEY})
        response.raise_for_status()
        rows = response.json()["usage"]
        return {row["operation"]: row["request_count"] for row in rows}, rows[0]["date"] if rows else ""

    async def reused_prompt_tokens(self) -> float | None:
        """The prefix cache's reused positions (one worker's ``/metrics``), to show it was used at all."""
        with suppress(httpx.HTTPError):
            text = (await self.client.get("/metrics", headers={"X-API-Key": ADMIN_KEY})).text
            values = {
                float(m.group(1))
                for m in re.finditer(r"^ai_platform_prompt_tokens_reused_total\{[^}]*\} (\S+)$", text, re.M)
            }
            return max(values) if values else None
        return None

    async def run(self) -> dict[str, Any]:
        args = self.args
        limits = (await self.client.get("/limits", headers={"X-API-Key": CLIENT_KEY})).json()["limits"]
        max_chars = {**FALLBACK_MAX_CHARS, **{row["operation"]: row["max_input_chars"] for row in limits}}
        missing = [op for op in OPERATIONS if op not in {row["operation"] for row in limits}]
        if missing:
            raise SystemExit(f"soak: the server does not serve {missing} (is examples/sentiment installed?)")
        self.traffic = Traffic(self.rng, max_chars, args.long_fraction)
        health = (await self.client.get("/health")).json()
        down = [m for m in health.get("models", []) if not m.get("loaded")]
        if down:
            raise SystemExit(f"soak: models not loaded: {down}")
        _, start_date = await self.operation_usage()
        self.known_processes = self.processes()
        expected = self.args.workers * (2 if self.args.workers > 1 else 1)
        if len(self.known_processes) != expected:
            print(f"soak: note: {len(self.known_processes)} worker/model processes, expected {expected}", flush=True)
        monitor = asyncio.ensure_future(self.monitor())

        total = args.minutes * 60
        gap = args.gap_seconds if args.gap_seconds is not None else (3.0 if total >= 300 else 2.0)
        phase_s = args.phase_seconds or min(20.0, max(4.0, total / 10))
        levels = [int(level) for level in args.levels.split(",")]
        print(
            f"soak: {args.minutes:g} min, {args.workers} worker(s), phases of {phase_s:g} s at {levels} clients "
            f"(cycling), {gap:g} s idle between, PREFIX_CACHE_MB={args.prefix_cache_mb}, KV_CACHE_MB={args.kv_cache_mb}",
            flush=True,
        )
        # Warm-up: one valid request of each operation, one after the other (counted like the rest).
        for operation in OPERATIONS:
            await self.one_request(operation)
        rss_after_warmup: float | None = None
        index = 0
        while not self.stop.is_set():
            remaining = total - self.elapsed()
            if remaining < 1.5 and index > 0:
                break
            await self.phase(levels[index % len(levels)], max(1.5, min(phase_s, remaining)))
            await asyncio.sleep(gap / 2)
            self.idle_rss.append((round(self.elapsed(), 1), round(self.rss_mb(), 1)))
            await asyncio.sleep(gap / 2)
            index += 1
            if index == len(levels) or rss_after_warmup is None:
                rss_after_warmup = self.idle_rss[-1][1]
        rss_end = self.rss_mb() if self.server.poll() is None else math.nan
        duration = self.elapsed()

        counters: dict[str, Any] = {}
        if self.server.poll() is None:
            await asyncio.sleep(1)  # audit rows are batched; usage is settled before the answer, but be safe
            counters = await self.check_counters(start_date)
            reused = await self.reused_prompt_tokens()
        else:
            counters = {"match": False, "problems": ["server not running: counters not read"]}
            reused = None
        self.stopping = True
        monitor.cancel()
        with suppress(asyncio.CancelledError):
            await monitor
        await self.client.aclose()
        return {
            "duration_s": round(duration, 1),
            "rss_after_warmup_mb": rss_after_warmup,
            "rss_end_mb": round(rss_end, 1),
            "counters": counters,
            "prompt_tokens_reused": reused,
        }

    async def check_counters(self, start_date: str) -> dict[str, Any]:
        """Usage per key and operation == the 200s each key's client saw (exactly for the main key)."""
        client_usage = await self.usage(CLIENT_KEY)
        disconnect_usage = await self.usage(DISCONNECT_KEY)
        by_operation, end_date = await self.operation_usage()
        admin_rows = (await self.client.get("/usage/keys", headers={"X-API-Key": ADMIN_KEY})).json()["usage"]
        per_key_total: Counter[str] = Counter()
        for row in admin_rows:
            per_key_total[row["operation"]] += row["request_count"]
        problems = []
        rows = {}
        for operation in OPERATIONS:
            seen = self.stats.ok_count(operation)
            dropped = self.stats.disconnects[operation]
            answered_200 = dropped["answered_200"]
            maybe = dropped["closed_mid_request"]
            counted = client_usage.get(operation, 0)
            counted_disconnect = disconnect_usage.get(operation, 0)
            rows[operation] = {
                "client_200s": seen,
                "usage_client_key": counted,
                "disconnect_answered_200": answered_200,
                "disconnect_closed": maybe,
                "usage_disconnect_key": counted_disconnect,
                "limits_usage": by_operation.get(operation, 0),
                "usage_keys_sum": per_key_total.get(operation, 0),
            }
            if counted != seen:
                problems.append(f"{operation}: usage of the client key {counted} != {seen} 200s seen")
            if not answered_200 <= counted_disconnect <= answered_200 + maybe:
                problems.append(
                    f"{operation}: usage of the disconnecting key {counted_disconnect} outside "
                    f"[{answered_200}, {answered_200 + maybe}] (answered 200 .. + closed mid-request)"
                )
            if by_operation.get(operation, 0) != counted + counted_disconnect:
                problems.append(
                    f"{operation}: /limits/usage {by_operation.get(operation, 0)} != per-key {counted} + {counted_disconnect}"
                )
            if per_key_total.get(operation, 0) != counted + counted_disconnect:
                problems.append(f"{operation}: /usage/keys sum {per_key_total.get(operation, 0)} != per-key /me")
        result: dict[str, Any] = {"per_operation": rows, "match": not problems, "problems": problems}
        if start_date != end_date:
            result.update(match=True, skipped=f"the limit day changed during the run ({start_date} -> {end_date})")
        return result


def malloc_env(perturb: int) -> dict[str, str]:
    """glibc heap checks. Since glibc 2.34 ``MALLOC_CHECK_`` works only with libc_malloc_debug.so preloaded."""
    env = {"MALLOC_CHECK_": "3", "MALLOC_PERTURB_": str(perturb)}
    found = [
        path
        for folder in ("/lib", "/lib64", "/usr/lib", "/usr/lib64")
        for path in sorted(
            glob.glob(f"{folder}/libc_malloc_debug.so.0") + glob.glob(f"{folder}/*/libc_malloc_debug.so.0")
        )
    ]
    if found:
        env["LD_PRELOAD"] = " ".join(filter(None, [found[0], os.environ.get("LD_PRELOAD", "")]))
    return env


def server_env(folder: Path, model: Path, args: argparse.Namespace) -> dict[str, str]:
    model = model.resolve()
    mapping = {operation: model.name for operation in OPERATIONS}
    settings = {
        "SECRET_KEY": "soak-secret-key-0123456789",
        "VALID_API_KEYS": json.dumps([CLIENT_KEY, DISCONNECT_KEY]),
        "ADMIN_API_KEYS": json.dumps([ADMIN_KEY]),
        "MODELS_DIR": str(model.parent),
        "OPERATION_MODEL_MAP": json.dumps(mapping),
        "DEFAULT_MODEL": model.name,
        "DATABASE_URL": f"sqlite://{folder / 'usage.sqlite3'}",
        "DEFAULT_DAILY_LIMIT": str(DAILY_LIMIT),
        "LOG_DIR": str(folder / "logs"),
        "LOG_LEVEL": "INFO",  # uvicorn reports a dead worker ("Child process [N] died") at INFO
        "PREFIX_CACHE_MB": str(args.prefix_cache_mb),
        "KV_CACHE_MB": str(args.kv_cache_mb),
        "METRICS_ACCESS": "admin",
    }
    # The server's own .env (it runs in ``folder``): the settings can be read, and rerun by hand, from there.
    (folder / ".env").write_text("".join(f"{name}={value}\n" for name, value in settings.items()))
    return settings


def setting_names() -> tuple[str, ...]:
    """Every settings variable: none is inherited from this process's environment."""
    import msgspec

    from ai_platform.settings import Settings

    return tuple(f.name.upper() for f in msgspec.structs.fields(Settings))


def wait_for_workers(output: Path, workers: int, seconds: float = 240) -> None:
    """With several workers /health answers as soon as one is up: wait for every one's startup line."""
    deadline = time.monotonic() + seconds
    while output.read_text(errors="replace").count("Application startup complete") < workers:
        if time.monotonic() > deadline:
            raise RuntimeError(f"fewer than {workers} workers started within {seconds:g} s")
        time.sleep(0.5)


def report(summary: dict[str, Any]) -> None:
    print(
        f"\n## Soak: {summary['minutes']:g} min, {summary['workers']} worker(s), {summary['duration_s']:.0f} s of traffic, "
        f"{len(summary['phases'])} phases"
    )
    statuses = sorted({s for counts in summary["requests"].values() for s in counts}, key=str)
    print("\n| operation | " + " | ".join(statuses) + " | p50 s | p99 s |")
    print("|---|" + "---|" * (len(statuses) + 2))
    for operation in OPERATIONS:
        counts = summary["requests"].get(operation, {})
        lat = summary["latency_s"].get(operation, {})
        cells = " | ".join(str(counts.get(s, 0)) for s in statuses)
        print(f"| {operation} | {cells} | {lat.get('p50', math.nan):.2f} | {lat.get('p99', math.nan):.2f} |")
    print(f"\ninvalid requests (must be 422): {summary['invalid_requests']}")
    print(f"disconnects: {summary['disconnects_total']}")
    print(f"admin calls: {summary['admin']}")
    print(
        f"output tokens: {summary['output_tokens']}; prefix-cache positions reused: {summary['prompt_tokens_reused']}"
    )
    rss = summary["rss"]
    print(
        f"RSS (server tree): after warm-up {rss['after_warmup_mb']} MB, end {rss['end_mb']} MB "
        f"({rss['change_pct']:+.1f}%), peak {rss['peak_mb']} MB; idle points {[m for _, m in rss['idle_mb']]}"
    )
    crashes = summary["crashes"]
    print(
        f"crashes: {crashes['count']} (server exit {crashes['server_exit_code']}, process deaths {crashes['process_deaths']}, "
        f"shutdown exit code {crashes['shutdown_exit_code']}, crash lines {len(crashes['log_lines'])})"
    )
    for line in crashes["log_lines"][:20]:
        print(f"   {line}")
    print(f"unexpected 5xx: {len(summary['unexpected_5xx'])}")
    for item in summary["unexpected_5xx"][:20]:
        print(f"   {item}")
    print(
        f"transport errors: {len(summary['transport_errors'])}; contract violations in 200s: {len(summary['bad_bodies'])}"
    )
    for item in (summary["transport_errors"] + summary["bad_bodies"])[:20]:
        print(f"   {item}")
    print(f"ERROR lines in the server log: {summary['error_log_lines']['count']}")
    for line in summary["error_log_lines"]["first"][:5]:
        print(f"   {line[:300]}")
    counters = summary["counters"]
    print(f"usage counters == 200s: {'yes' if counters.get('match') else 'NO'} {counters.get('skipped', '')}")
    for operation, row in counters.get("per_operation", {}).items():
        print(f"   {operation}: {row}")
    for problem in counters.get("problems", []):
        print(f"   !! {problem}")
    print(f"\nheap checks: {summary['malloc_env']}")
    print("RESULT: " + ("PASS" if not summary["failures"] else "FAIL: " + "; ".join(summary["failures"])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30, help="traffic time (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=1, help="ai-platform serve --workers (default: 1)")
    parser.add_argument("--model", type=Path, default=DEMO_MODEL, help="served model folder (default: the demo model)")
    parser.add_argument("--json", type=Path, help="write the summary here")
    parser.add_argument("--seed", type=int, default=1, help="traffic's random seed")
    parser.add_argument("--levels", default="1,4,16,4", help="concurrent clients of each phase, cycling")
    parser.add_argument("--phase-seconds", type=float, help="per phase (default: minutes*6 s, 4..20)")
    parser.add_argument("--gap-seconds", type=float, help="idle time between phases (default: 3, or 2 under 5 min)")
    parser.add_argument("--long-fraction", type=float, default=0.04, help="inputs at the operation's limit")
    parser.add_argument(
        "--weights",
        type=lambda text: tuple(float(w) for w in text.split(",")),
        default=WEIGHTS,
        help=f"share of each of {', '.join(OPERATIONS)} (default: {','.join(map(str, WEIGHTS))}); "
        "more classify and sentiment, which answer in one pass, give more requests per minute",
    )
    parser.add_argument(
        "--prefix-cache-mb",
        type=int,
        default=4,
        help="PREFIX_CACHE_MB; 4 holds one or two short prompts of the demo model (45 KiB a position): "
        "constant evictions, longer prompts never cached (default: %(default)s)",
    )
    parser.add_argument(
        "--kv-cache-mb",
        type=int,
        default=2048,
        help="KV_CACHE_MB: below what 16 clients near the input limits would take, so generations wait for room "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--max-peak-mb",
        type=float,
        help="fail if the server tree's RSS ever exceeds this (default: per worker KV_CACHE_MB + 2,560 MB, plus "
        "512: the decode batch's budget, under heap checks every page of it resident; a prefill and four "
        "classify jobs' prompt caches; each process's own ~250 MB)",
    )
    parser.add_argument(
        "--max-rss-growth",
        type=float,
        default=0.10,
        help="fail if the server tree's RSS at the end exceeds its RSS after warm-up by more than this "
        "fraction (default: %(default)s, i.e. flat within 10%%)",
    )
    parser.add_argument("--malloc-perturb", type=int, default=165, help="MALLOC_PERTURB_ (default: %(default)s)")
    parser.add_argument("--no-heap-checks", action="store_true", help="run without MALLOC_CHECK_/MALLOC_PERTURB_")
    parser.add_argument("--keep", action="store_true", help="keep the server's folder (logs, database)")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="soak-"))
    env = server_env(folder, args.model, args)
    heap = {} if args.no_heap_checks else malloc_env(args.malloc_perturb)
    output = folder / "server.out"
    cli = str(Path(sys.executable).parent / "ai-platform")
    if not Path(cli).exists():
        cli = str(ROOT / ".venv" / "bin" / "ai-platform")
    command = [cli, "serve", "--workers", str(args.workers), "--port"]
    print(f"soak: server folder {folder}, output {output}", flush=True)
    server, port = start_server(
        {**env, **heap}, folder, command, output=output, drop=(*setting_names(), "MALLOC_CHECK_", "MALLOC_PERTURB_")
    )
    try:
        wait_for_workers(output, args.workers)
        soak = Soak(args, port, server, folder)
        result = asyncio.run(soak.run())
    finally:
        if server.poll() is None:
            server.terminate()
            try:
                shutdown_code: int | None = server.wait(timeout=120)
            except Exception:
                server.kill()
                shutdown_code = server.wait()
        else:
            shutdown_code = None
    crash_lines, error_lines = soak.scan_logs()
    stats = soak.stats
    # uvicorn logs a dead worker, the server a dead model process; the pid watch sees both too.
    died_lines = [line for line in crash_lines if DEATH_LINE.search(line)]
    deaths = max(len(soak.process_deaths), len(died_lines))
    # uvicorn re-raises the SIGTERM it stopped on: -15 is a clean shutdown.
    count = deaths + (soak.server_exit is not None) + (shutdown_code not in (None, 0, -signal.SIGTERM))
    if count == 0 and crash_lines:
        count = 1  # glibc complained without a process dying (MALLOC_CHECK_ other than 3)
    rss_warm = result["rss_after_warmup_mb"] or math.nan
    summary: dict[str, Any] = {
        "minutes": args.minutes,
        "workers": args.workers,
        "model": str(args.model),
        "seed": args.seed,
        "prefix_cache_mb": args.prefix_cache_mb,
        "kv_cache_mb": args.kv_cache_mb,
        "malloc_env": heap,
        "duration_s": result["duration_s"],
        "phases": soak.phases,
        "requests": {op: dict(stats.statuses[op]) for op in OPERATIONS},
        "requests_total": sum(sum(stats.statuses[op].values()) for op in OPERATIONS),
        "latency_s": {
            op: {
                "p50": round(percentile(stats.latencies[op], 0.5), 3),
                "p99": round(percentile(stats.latencies[op], 0.99), 3),
                "mean": round(statistics.fmean(stats.latencies[op]), 3) if stats.latencies[op] else math.nan,
                "n": len(stats.latencies[op]),
            }
            for op in OPERATIONS
        },
        "invalid_requests": dict(stats.invalid_statuses),
        "disconnects": {op: dict(stats.disconnects[op]) for op in OPERATIONS},
        "disconnects_total": dict(sum((stats.disconnects[op] for op in OPERATIONS), Counter())),
        "admin": dict(stats.admin),
        "output_tokens": stats.output_tokens,
        "prompt_tokens_reused": result["prompt_tokens_reused"],
        "rss": {
            "after_warmup_mb": rss_warm,
            "end_mb": result["rss_end_mb"],
            "change_pct": round((result["rss_end_mb"] - rss_warm) / rss_warm * 100, 1),
            "peak_mb": round(soak.peak_rss_mb, 1),
            "idle_mb": soak.idle_rss,
        },
        "crashes": {
            "count": count,
            "server_exit_code": soak.server_exit,
            "shutdown_exit_code": shutdown_code,
            "process_deaths": soak.process_deaths,
            "log_lines": crash_lines[:50],
        },
        "unexpected_5xx": stats.unexpected_5xx,
        "transport_errors": stats.transport_errors,
        "bad_bodies": stats.bad_bodies,
        "error_log_lines": {"count": len(error_lines), "first": error_lines[:20]},
        "counters": result["counters"],
        "server_folder": str(folder) if args.keep or count else None,
    }
    failures = []
    if count:
        failures.append(f"{count} crash(es)")
    if stats.unexpected_5xx:
        failures.append(f"{len(stats.unexpected_5xx)} unexpected 5xx")
    if stats.transport_errors:
        failures.append(f"{len(stats.transport_errors)} transport errors")
    if stats.bad_bodies:
        failures.append(f"{len(stats.bad_bodies)} 200s breaking the contract")
    if not result["counters"].get("match"):
        failures.append("usage counters != 200s")
    max_peak = args.max_peak_mb or args.workers * (args.kv_cache_mb + 2560) + 512
    if soak.peak_rss_mb > max_peak:
        failures.append(f"peak RSS {soak.peak_rss_mb:.0f} MB > {max_peak:.0f} MB")
    rss_end = result["rss_end_mb"]
    if rss_end > rss_warm * (1 + args.max_rss_growth):  # NaN (no reading) compares false: a crash is counted above
        failures.append(
            f"RSS grew {(rss_end - rss_warm) / rss_warm:+.1%} after warm-up ({rss_warm:.0f} -> {rss_end:.0f} MB), "
            f"more than {args.max_rss_growth:.0%}"
        )
    if error_lines:
        failures.append(f"{len(error_lines)} ERROR/CRITICAL lines in the server log")
    wrong_invalid = sum(n for status, n in stats.invalid_statuses.items() if status != "422")
    if wrong_invalid:
        failures.append(f"{wrong_invalid} invalid requests not answered 422")
    summary["failures"] = failures
    report(summary)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2, default=str))
    if not (args.keep or count):
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
    else:
        print(f"server folder kept: {folder}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
