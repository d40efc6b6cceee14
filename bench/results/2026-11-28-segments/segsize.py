# For NOTES.md (run with the project's .venv python): how full the data segments are that a
# receiver gets over loopback from the bench's origins, as TCP_INFO counts them (ss -ti:
# bytes_received / data_segs_in, against advmss), with no proxy: the TLS download's, and
# iperf3's in its reverse mode (the server sends).
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))
from bench import origins, procs, tools  # noqa: E402
from bench.scenarios import MODES  # noqa: E402
from bench.systems import System  # noqa: E402

hard = procs.raise_fd_limit()


def fill(port: int) -> str:
    """Each busy receiving socket whose peer is port: bytes per data segment, and that over advmss."""
    out = subprocess.run(["ss", "-tinH", f"( dport = :{port} )"], capture_output=True, text=True).stdout
    found = []
    for m in re.finditer(r"advmss:(\d+).*?bytes_received:(\d+).*?data_segs_in:(\d+)", out, re.S):
        advmss, received, segments = map(int, m.groups())
        if received > 10_000_000:
            found.append(f"{received / segments:,.0f} bytes a segment = {received / segments / advmss:.2f} of {advmss}")
    return "; ".join(found) or "none busy"


with origins.running("segsize-", download_bytes=MODES["full"].download_bytes, nofile=hard) as (workdir, backends):
    direct = System(backends, workdir)
    for name, address, run in (
            ("TLS download (curl from nginx)", direct.address("tls"),
             lambda a: tools.curl_download(a, MODES["full"].download_bytes, 30)),
            ("iperf3 -R, 1 stream", direct.address("iperf"), lambda a: tools.iperf3(a, 3, 1, True, 10))):
        worker = threading.Thread(target=run, args=(address,))
        worker.start()
        time.sleep(0.8)
        print(f"{name}: {fill(address[1])}", flush=True)
        worker.join()
