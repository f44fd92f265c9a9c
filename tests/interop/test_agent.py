"""The Python `spiffe` package (unchanged, pinned) talks to a real `sigil agent`."""
import os
import time

import pytest
from spiffe import WorkloadApiClient

from conftest import TD, Agent, wait_for


def entry(sigil, node_id, name, ttl="1h"):
    return sigil.admin("entry", "create", "--spiffe-id", f"spiffe://{TD}/{name}",
                       "--parent-id", node_id, "--selector", f"unix:uid:{os.getuid()}",
                       "--x509-ttl", ttl)


def test_python_spiffe_fetches_svids_bundles_and_validates(sigil, tmp_path):
    agent = Agent(sigil, tmp_path)
    try:
        entry(sigil, agent.node_id, "py")
        with WorkloadApiClient(socket_path=agent.endpoint) as client:
            svid = wait_for(client.fetch_x509_svid, 15, "an X.509-SVID")
            assert str(svid.spiffe_id) == f"spiffe://{TD}/py"
            bundles = client.fetch_x509_bundles()
            assert [str(b.trust_domain) for b in bundles.bundles] == [TD]
            jwt = client.fetch_jwt_svid(audience={"model-gw"})
            assert str(jwt.spiffe_id) == f"spiffe://{TD}/py"
            ok = client.validate_jwt_svid(jwt.token, "model-gw")
            assert str(ok.spiffe_id) == f"spiffe://{TD}/py"
            with pytest.raises(Exception):
                client.validate_jwt_svid(jwt.token, "someone-else")
            head, body, sig = jwt.token.split(".")
            forged = ".".join([head, body, ("A" if sig[3] != "A" else "B").join([sig[:3], sig[4:]])])
            with pytest.raises(Exception):
                client.validate_jwt_svid(forged, "model-gw")
            jwt_bundles = client.fetch_jwt_bundles()
            assert len(jwt_bundles.bundles) == 1
    finally:
        agent.stop()


def test_offline_serving_until_expiry_then_recovery(sigil, tmp_path):
    agent = Agent(sigil, tmp_path)
    try:
        entry(sigil, agent.node_id, "offline", ttl="60s")
        with WorkloadApiClient(socket_path=agent.endpoint) as client:
            first = wait_for(client.fetch_x509_svid, 15, "an X.509-SVID")
        # Server down: the cached SVID is still served, also after an agent restart.
        sigil.stop()
        with WorkloadApiClient(socket_path=agent.endpoint) as client:
            svid = client.fetch_x509_svid()
            assert svid.leaf.not_valid_after_utc.timestamp() > time.time()
        agent.stop()
        agent.start()
        with WorkloadApiClient(socket_path=agent.endpoint, default_timeout=10) as client:
            svid = wait_for(client.fetch_x509_svid, 10, "a cached SVID after restart")
            expires = svid.leaf.not_valid_after_utc.timestamp()
            assert expires > time.time()
            # Never past expiry: once it has expired, nothing is served.
            time.sleep(max(0.0, expires - time.time()) + 2.5)
            with pytest.raises(Exception):
                client.fetch_x509_svid()
        # The server comes back: the agent recovers on its own.
        sigil.start()
        with WorkloadApiClient(socket_path=agent.endpoint, default_timeout=10) as client:
            fresh = wait_for(client.fetch_x509_svid, 40, "a fresh SVID after the server returned")
            assert fresh.leaf.not_valid_after_utc.timestamp() > time.time()
            assert fresh.leaf.serial_number != first.leaf.serial_number
    finally:
        agent.stop()
