"""A flood of idle connections (tests and scripts/bench.sh): holds N TCP connections to
HOST:PORT that never send a byte, re-opening each one the server closes. Prints "ready" once
all N are opened; at EOF on stdin prints "reopened COUNT" and exits.

    python3 flood.py 127.0.0.1:PORT 2000
"""
import resource
import selectors
import socket
import sys
import time

host, port = sys.argv[1].rsplit(":", 1)
target = (host.strip("[]"), int(port))
n = int(sys.argv[2])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if soft < n + 64:
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
sel = selectors.DefaultSelector()
family = socket.AF_INET6 if ":" in target[0] else socket.AF_INET


def open_one():
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setblocking(False)
    try:
        s.connect(target)
    except BlockingIOError:
        pass
    except OSError:
        pass  # refused: the selector reports it and it is re-opened
    sel.register(s, selectors.EVENT_READ)


for _ in range(n):
    open_one()
sel.register(sys.stdin, selectors.EVENT_READ)
print("ready", flush=True)
reopened = 0
while True:
    for key, _ in sel.select():
        s = key.fileobj
        if s is sys.stdin:
            if not sys.stdin.readline():
                print(f"reopened {reopened}", flush=True)
                sys.exit(0)
            continue
        try:
            if s.recv(4096):
                continue
        except BlockingIOError:
            continue
        except ConnectionRefusedError:
            time.sleep(0.001)  # nothing listens: do not spin
        except OSError:
            pass
        sel.unregister(s)
        s.close()
        reopened += 1
        open_one()
