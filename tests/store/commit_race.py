"""Two processes racing to commit one step (the conditional create decides the winner)."""

RACE = """
import sys, time
from supervisor.store.catalog import Catalog, AlreadyCommitted
url, step, go = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
cat = Catalog(url)
cat.steps()  # warm up the client so both race on the commit itself
time.sleep(max(0.0, go - time.time()))
try:
    cat.commit(step, writer=sys.argv[4])
    print("WON")
except AlreadyCommitted as err:
    print("LOST", err)
"""
