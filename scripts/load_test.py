"""Load test of a PromptFleet server (N concurrent clients, streaming and not, many
adapters and tenants; checks every answer; prints ONE JSON line). The code lives in
``promptfleet.bench.load_bench`` (also runnable as ``python -m promptfleet.bench.load_bench``):

    python scripts/load_test.py --duration 60 --clients 200 --adapters 20 --tenants 2
    python scripts/load_test.py --url http://127.0.0.1:8000 --admin-key KEY --model CKPT --server-pid PID
"""
import sys

from promptfleet.bench.load_bench import main

if __name__ == "__main__":
    sys.exit(main())
