#!/bin/sh
# Installs Outbox on a Debian host (systemd): binaries, units, example
# configuration, secrets and the tunnel PKI. Run it again to upgrade: it
# replaces binaries, units and the examples under /usr/share/doc/outbox, and
# never overwrites a configuration file, a secret or a key.
#
#   deploy/install.sh                       build (cargo build --release), install the daemon side
#   deploy/install.sh --binaries DIR        install prebuilt binaries from DIR, no build
#   deploy/install.sh --role relay          the relay (MID server) side
#   deploy/install.sh --root DIR            install under DIR (a staging tree); no systemctl
#
# See deploy/README.md.
set -eu

usage() {
    cat <<'EOF'
Usage: install.sh [OPTIONS]

  --role daemon|relay|all  what to install (default: daemon)
                             daemon: outboxd, outbox, outboxd.service, /etc/outbox
                             relay:  outbox-relay, outbox-relay.service, /etc/outbox-relay
                             all:    both, on one host (a demo or a test bed)
  --binaries DIR           take prebuilt binaries from DIR instead of building
                           with `cargo build --release`
  --root DIR               install below DIR instead of / (also: $DESTDIR);
                           systemctl is not run
  --host NAME              a name relays use to reach this daemon, put in its
                           tunnel certificate (repeatable; default: this host's
                           name, plus localhost)
  -h, --help               this text
EOF
}

die() {
    echo "install.sh: $*" >&2
    exit 1
}

note() {
    echo "  $*"
}

ROLE=daemon
BINARIES=
ROOT=${DESTDIR:-}
HOSTS=

while [ $# -gt 0 ]; do
    case $1 in
        --role)
            [ $# -ge 2 ] || die "--role needs a value"
            ROLE=$2
            shift 2
            ;;
        --role=*)
            ROLE=${1#--role=}
            shift
            ;;
        --binaries)
            [ $# -ge 2 ] || die "--binaries needs a directory"
            BINARIES=$2
            shift 2
            ;;
        --binaries=*)
            BINARIES=${1#--binaries=}
            shift
            ;;
        --root)
            [ $# -ge 2 ] || die "--root needs a directory"
            ROOT=$2
            shift 2
            ;;
        --root=*)
            ROOT=${1#--root=}
            shift
            ;;
        --host)
            [ $# -ge 2 ] || die "--host needs a name"
            HOSTS="$HOSTS $2"
            shift 2
            ;;
        --host=*)
            HOSTS="$HOSTS ${1#--host=}"
            shift
            ;;
        -h | --help)
            usage
            exit 0
            ;;
        *)
            usage >&2
            die "unknown argument: $1"
            ;;
    esac
done

case $ROLE in
    daemon) WANT_DAEMON=1 WANT_RELAY='' ;;
    relay) WANT_DAEMON='' WANT_RELAY=1 ;;
    all) WANT_DAEMON=1 WANT_RELAY=1 ;;
    *) die "--role must be daemon, relay or all, not \"$ROLE\"" ;;
esac

# The source tree: this script lives in its deploy/ folder.
SRC=$(cd "$(dirname "$0")/.." && pwd)
if [ ! -f "$SRC/systemd/outboxd.service" ] || [ ! -f "$SRC/deploy/outboxd.toml" ]; then
    die "cannot find the Outbox source tree around $0"
fi

if [ -n "$ROOT" ]; then
    mkdir -p "$ROOT"
    ROOT=$(cd "$ROOT" && pwd)
    [ "$ROOT" != / ] || ROOT=
elif [ "$(id -u)" -ne 0 ]; then
    die "run as root (or give --root DIR to install into a staging tree)"
fi

# --- Binaries ----------------------------------------------------------------
if [ -z "$BINARIES" ]; then
    command -v cargo >/dev/null 2>&1 ||
        die "cargo not found: build as your user first (cargo build --release) and pass --binaries target/release"
    set --
    [ -z "$WANT_DAEMON" ] || set -- "$@" -p outbox-daemon
    [ -z "$WANT_RELAY" ] || set -- "$@" -p outbox-relay
    echo "Building: cargo build --release $*"
    (cd "$SRC" && cargo build --release --bins "$@") || die "the build failed"
    BINARIES=${CARGO_TARGET_DIR:-$SRC/target}/release
fi
[ -d "$BINARIES" ] || die "--binaries $BINARIES is not a directory"
BINARIES=$(cd "$BINARIES" && pwd)

NEEDED=
[ -z "$WANT_DAEMON" ] || NEEDED="outboxd outbox"
[ -z "$WANT_RELAY" ] || NEEDED="$NEEDED outbox-relay"
for bin in $NEEDED; do
    [ -x "$BINARIES/$bin" ] ||
        die "$BINARIES/$bin is missing or not executable (build it: cargo build --release --bins)"
done

umask 022

# copy SRC DEST MODE: replaces DEST atomically (a running binary is not
# written into: the new file is renamed over it).
copy() {
    mkdir -p "$(dirname "$2")"
    cp "$1" "$2.new.$$"
    chmod "$3" "$2.new.$$"
    mv -f "$2.new.$$" "$2"
}

# config SRC DEST MODE: installs DEST only where there is none.
config() {
    if [ -e "$2" ]; then
        note "kept      $2 (exists; the current example is in $DOC/examples)"
    else
        copy "$1" "$2" "$3"
        note "installed $2"
    fi
}

# secret DEST: a new random token (256 bits, hex), mode 0600, unless DEST exists.
secret() {
    if [ -e "$1" ]; then
        note "kept      $1 (exists)"
        return
    fi
    (
        umask 077
        od -An -N32 -tx1 /dev/urandom | tr -d ' \n' >"$1.new.$$"
        echo >>"$1.new.$$"
    )
    chmod 0600 "$1.new.$$"
    mv "$1.new.$$" "$1"
    note "generated $1 (mode 0600)"
}

BIN=$ROOT/usr/bin
UNITS=$ROOT/etc/systemd/system
DOC=$ROOT/usr/share/doc/outbox
ETC=$ROOT/etc/outbox
RELAY_ETC=$ROOT/etc/outbox-relay

echo "Installing Outbox ($ROLE) from $BINARIES into ${ROOT:-/}"

for bin in $NEEDED; do
    copy "$BINARIES/$bin" "$BIN/$bin" 0755
    note "installed $BIN/$bin"
done

# Documentation and examples: always the current ones.
copy "$SRC/deploy/README.md" "$DOC/README.md" 0644
copy "$SRC/deploy/outboxd.toml" "$DOC/examples/outboxd.toml" 0644
copy "$SRC/deploy/relay.toml" "$DOC/examples/relay.toml" 0644
for f in "$SRC"/deploy/integrations.d/*.toml; do
    copy "$f" "$DOC/examples/integrations.d/$(basename "$f")" 0644
done
note "installed $DOC (README.md, examples/)"

# --- The daemon ----------------------------------------------------------------
if [ -n "$WANT_DAEMON" ]; then
    copy "$SRC/systemd/outboxd.service" "$UNITS/outboxd.service" 0644
    note "installed $UNITS/outboxd.service"

    mkdir -p "$ETC/integrations.d"
    chmod 0755 "$ETC" "$ETC/integrations.d"
    config "$SRC/deploy/outboxd.toml" "$ETC/outboxd.toml" 0644

    # The credentials the unit's LoadCredential= lines name.
    secret "$ETC/api-token"
    secret "$ETC/mid-dc1-token"

    # The tunnel PKI: a CA, the daemon's certificate and key.
    if [ -e "$ETC/pki/daemon.key" ]; then
        note "kept      $ETC/pki (daemon.key exists)"
    else
        if [ -z "$HOSTS" ]; then
            HOSTS="$(hostname -f 2>/dev/null || uname -n) localhost"
        fi
        set --
        for h in $HOSTS; do
            set -- "$@" --host "$h"
        done
        "$BINARIES/outbox" pki init "$ETC/pki" "$@" >/dev/null ||
            die "outbox pki init $ETC/pki failed"
        # pki init also writes a relay token and config snippets; this layout
        # keeps the token as mid-dc1-token (generated above) and the config in
        # outboxd.toml, so drop them.
        rm -f "$ETC/pki/relay-token" "$ETC/pki/outboxd.toml" "$ETC/pki/relay.toml"
        chmod 0755 "$ETC/pki"
        note "generated $ETC/pki (ca.crt, ca.key, daemon.crt, daemon.key for:$HOSTS)"
    fi
fi

# --- The relay -------------------------------------------------------------------
if [ -n "$WANT_RELAY" ]; then
    copy "$SRC/systemd/outbox-relay.service" "$UNITS/outbox-relay.service" 0644
    note "installed $UNITS/outbox-relay.service"

    mkdir -p "$RELAY_ETC"
    chmod 0755 "$RELAY_ETC"
    config "$SRC/deploy/relay.toml" "$RELAY_ETC/relay.toml" 0644
    # On one host with the daemon, the relay's token and CA are right here.
    if [ -n "$WANT_DAEMON" ]; then
        if [ ! -e "$RELAY_ETC/relay-token" ]; then
            (umask 077 && cp "$ETC/mid-dc1-token" "$RELAY_ETC/relay-token")
            chmod 0600 "$RELAY_ETC/relay-token"
            note "copied    $ETC/mid-dc1-token to $RELAY_ETC/relay-token"
        fi
        if [ ! -e "$RELAY_ETC/ca.crt" ]; then
            copy "$ETC/pki/ca.crt" "$RELAY_ETC/ca.crt" 0644
            note "copied    $ETC/pki/ca.crt to $RELAY_ETC/ca.crt"
        fi
    fi
fi

# --- systemd -------------------------------------------------------------------
if [ -n "$ROOT" ]; then
    note "skipped   systemctl daemon-reload (--root)"
elif command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    note "ran       systemctl daemon-reload"
else
    note "skipped   systemctl daemon-reload (systemd is not running)"
fi

echo
echo "Next steps:"
if [ -n "$WANT_DAEMON" ]; then
    cat <<EOF
  1. Edit /etc/outbox/outboxd.toml (instance_name, listeners, MID servers).
  2. Add integration files to /etc/outbox/integrations.d/ (examples:
     /usr/share/doc/outbox/examples/integrations.d/); give each secret they
     name as a credential: systemctl edit outboxd, then
       [Service]
       LoadCredential=NAME:/etc/outbox/NAME
  3. systemctl enable --now outboxd
     journalctl -u outboxd -f
  4. OUTBOX_TOKEN="\$(cat /etc/outbox/api-token)" outbox status
EOF
fi
if [ -n "$WANT_RELAY" ]; then
    if [ -z "$WANT_DAEMON" ]; then
        cat <<EOF
  1. From the daemon host, copy /etc/outbox/pki/ca.crt to /etc/outbox-relay/ca.crt
     and /etc/outbox/mid-dc1-token to /etc/outbox-relay/relay-token (mode 0600).
EOF
    fi
    cat <<EOF
  - Edit /etc/outbox-relay/relay.toml (name, daemons, allow).
  - systemctl enable --now outbox-relay
EOF
fi
