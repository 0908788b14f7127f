"""Secured-NATS settings that cannot work stop the program at start with a message naming the
setting: missing or unreadable files, files of the wrong kind, half a client certificate."""

import subprocess
import sys
from pathlib import Path

import pytest

from kloudmeter_py.config import Settings
from kloudmeter_py.errors import ConfigError
from kloudmeter_py.store import credentials
from tests import secured


def _write(tmp_path: Path, name: str, text: str) -> str:
    return secured.write_secret(tmp_path / name, text)


def _creds(tmp_path: Path) -> tuple[str, secured.Key, secured.Key]:
    account, user = secured.account_key(), secured.user_key()
    jwt = secured.user_jwt(account, user)
    return _write(tmp_path, "u.creds", secured.creds_text(jwt, user)), account, user


def test_a_creds_file_gives_the_jwt_and_signs_the_nonce(tmp_path: Path) -> None:
    """A .creds file yields CONNECT jwt + sig; the signature verifies with the user's key."""
    import base64

    import nkeys

    path, _, user = _creds(tmp_path)
    creds = credentials.load(Settings(nats_creds=path))
    fields = creds.connect_fields({"nonce": "abc123"})
    assert set(fields) == {"jwt", "sig"} and fields["jwt"].count(".") == 2
    sig = base64.urlsafe_b64decode(fields["sig"] + "=" * (-len(fields["sig"]) % 4))
    assert nkeys.from_seed(bytearray(user.seed)).verify(b"abc123", sig)
    assert user.seed.decode() not in repr(creds)
    assert creds.connect_fields({}) == {}  # a server without NKEY users asks for nothing


def test_a_seed_file_gives_the_public_nkey(tmp_path: Path) -> None:
    """An NKEY seed file (with or without a trailing newline or comments) yields nkey + sig."""
    user = secured.user_key()
    path = _write(tmp_path, "u.nk", f"# service user\n{user.seed.decode()}\n")
    fields = credentials.load(Settings(nats_nkey_seed=path)).connect_fields({"nonce": "n"})
    assert fields["nkey"] == user.public and "jwt" not in fields


def _bad_cases(tmp_path: Path) -> list[tuple[dict[str, str], str]]:
    creds, account, user = _creds(tmp_path)
    other = secured.user_key()
    account_seed = _write(tmp_path, "a.nk", secured.account_key().seed.decode())
    mismatched = _write(
        tmp_path, "mismatch.creds", secured.creds_text(secured.user_jwt(account, user), other)
    )
    account_jwt = secured.account_jwt(secured.operator_key(), account)
    not_user = _write(tmp_path, "acct.creds", secured.creds_text(account_jwt, user))
    garbage = _write(tmp_path, "garbage.txt", "hello\n")
    bad_seed = _write(tmp_path, "bad.nk", "S" + "A" * 57 + "\n")
    ca = secured.make_ca(tmp_path)
    client = secured.make_cert(tmp_path, ca, "client", server=False)
    other_key = secured.make_cert(tmp_path, ca, "other", server=False)[1]
    return [
        ({"nats_creds": str(tmp_path / "missing.creds")}, r"NATS_CREDS: .*does not exist"),
        ({"nats_creds": str(tmp_path)}, r"NATS_CREDS: cannot read"),
        ({"nats_creds": garbage}, r"NATS_CREDS: .* is not a NATS credentials file"),
        ({"nats_creds": not_user}, r"NATS_CREDS: .* not a user JWT"),
        ({"nats_creds": mismatched}, r"NATS_CREDS: .*seed does not belong to the JWT's user"),
        ({"nats_nkey_seed": str(tmp_path / "x.nk")}, r"NATS_NKEY_SEED: .*does not exist"),
        ({"nats_nkey_seed": garbage}, r"NATS_NKEY_SEED: .* is not an NKEY seed file"),
        ({"nats_nkey_seed": bad_seed}, r"NATS_NKEY_SEED: .* holds no valid NKEY seed"),
        ({"nats_nkey_seed": account_seed}, r"NATS_NKEY_SEED: .*an account, not a user's"),
        ({"nats_nkey_seed": creds}, r"NATS_NKEY_SEED: .*"),  # a creds file is accepted ...
        ({"nats_tls_ca": garbage}, r"NATS_TLS_CA: .* holds no PEM CA certificate"),
        ({"nats_tls_ca": str(tmp_path / "no.pem")}, r"NATS_TLS_CA: .*does not exist"),
        (
            {"nats_tls_cert": str(client[0]), "nats_tls_key": str(other_key)},
            r"NATS_TLS_CERT: .* is not a PEM certificate and its private key",
        ),
        (
            {"nats_tls_cert": str(tmp_path / "c.pem"), "nats_tls_key": str(client[1])},
            r"NATS_TLS_CERT: .*does not exist",
        ),
        (
            {"nats_tls_cert": str(client[0]), "nats_tls_key": str(tmp_path / "k.pem")},
            r"NATS_TLS_KEY: .*does not exist",
        ),
    ]


def test_files_that_cannot_work_name_the_setting(tmp_path: Path) -> None:
    """Each broken file gives a ConfigError that starts with the setting's name."""
    for values, message in _bad_cases(tmp_path):
        if values.get("nats_nkey_seed", "").endswith(".creds"):
            # ... as a seed file: its seed block is the user's seed.
            credentials.load(Settings(**values))
            continue
        with pytest.raises(ConfigError, match=f"^{message}"):
            credentials.load(Settings(**values))


def test_settings_that_cannot_go_together_are_refused() -> None:
    """A creds file and a seed at once, or half a client certificate, are refused."""
    with pytest.raises(ConfigError, match=r"^NATS_NKEY_SEED: set either"):
        Settings(nats_creds="a.creds", nats_nkey_seed="a.nk")
    with pytest.raises(ConfigError, match=r"^NATS_TLS_KEY: "):
        Settings(nats_tls_cert="c.pem")
    with pytest.raises(ConfigError, match=r"^NATS_TLS_CERT: "):
        Settings(nats_tls_key="k.pem")
    env = {"NATS_CREDS": "x.creds", "NATS_TLS_CA": "ca.pem"}
    s = Settings.from_env(env, nats_tls_ca="other.pem")
    assert (s.nats_creds, s.nats_tls_ca) == ("x.creds", "other.pem")


@pytest.mark.parametrize("command", ["setup", "worker", "gateway", "up"])
def test_commands_stop_before_connecting_on_a_missing_file(command: str, tmp_path: Path) -> None:
    """Every command exits 2 naming NATS_CREDS, before it reaches for NATS."""
    proc = subprocess.run(
        [sys.executable, "-m", "kloudmeter_py", command],
        env={
            "PATH": "/usr/bin:/bin",
            "NATS_URL": "nats://127.0.0.1:1",
            "NATS_CREDS": str(tmp_path / "nope.creds"),
            "KLOUDMETER_DATA_DIR": str(tmp_path / "data"),
        },
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert "configuration error: NATS_CREDS: " in proc.stderr
    assert not (tmp_path / "data").exists()


def test_up_never_starts_an_open_server_in_place_of_a_secured_one(tmp_path: Path) -> None:
    """With credentials set and no server answering, `kloudmeter up` refuses to start one."""
    user = secured.user_key()
    seed = _write(tmp_path, "u.nk", user.seed.decode())
    proc = subprocess.run(
        [sys.executable, "-m", "kloudmeter_py", "up"],
        env={
            "PATH": "/usr/bin:/bin",
            "NATS_URL": "nats://127.0.0.1:1",
            "NATS_NKEY_SEED": seed,
            "KLOUDMETER_DATA_DIR": str(tmp_path / "data"),
        },
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert "NATS_NKEY_SEED: no NATS server answers" in proc.stderr
    assert not (tmp_path / "data").exists()
