#!/usr/bin/env bash
# Install AI Platform on Ubuntu 22.04/24.04 (Debian family) or AlmaLinux 8/9 (RHEL family),
# offline, from this project folder and a wheelhouse built by deploy/build-wheelhouse.sh.
# Follows the steps of deploy/README.md. Safe to run again: it upgrades the code and keeps
# .env, the database, the models and the TLS certificate.
#
#   sudo deploy/install.sh [--wheelhouse DIR] [--server-name NAME]     install for real
#   deploy/install.sh --dry-run [--family debian|rhel]                 print the commands only
#   deploy/install.sh --prefix DIR [--wheelhouse DIR]                  install under DIR as the
#       current user (no packages, users, systemctl, nginx reload or SELinux): for CI and staging
set -euo pipefail

usage() {
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    cat <<'EOF'
Options:
  --dry-run            print every command instead of running it
  --prefix DIR         install under DIR (files only; see above)
  --family F           debian or rhel (default: from /etc/os-release)
  --wheelhouse DIR     wheels to install from (default: <project>/wheelhouse)
  --python CMD         Python 3.11+ to create the venv with (default: python3.11, else python3)
  --server-name NAME   nginx server_name and TLS certificate name (default: ai-platform.local)
  --no-packages        do not install system packages (they are already there)
EOF
}

SOURCE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DRY_RUN=0
PREFIX=""
FAMILY=""
WHEELHOUSE="$SOURCE/wheelhouse"
PYTHON=""
SERVER_NAME="ai-platform.local"
PACKAGES=1

while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --prefix) PREFIX=$(realpath -m "$2"); shift ;;
        --family) FAMILY=$2; shift ;;
        --wheelhouse) WHEELHOUSE=$(realpath -m "$2"); shift ;;
        --python) PYTHON=$2; shift ;;
        --server-name) SERVER_NAME=$2; shift ;;
        --no-packages) PACKAGES=0 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

SERVICE_USER=aiplatform
APP="$PREFIX/opt/ai_platform"
VENV="$APP/venv"
UNIT="$PREFIX/etc/systemd/system/ai-platform.service"
TLS="$PREFIX/etc/nginx/tls"
PLUGINS=(ai-platform-summarize ai-platform-translate ai-platform-classify)

say() { printf '==> %s\n' "$*"; }
die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }

# Every change to the system goes through run: printed in dry-run mode, executed otherwise.
run() {
    if [[ $DRY_RUN == 1 ]]; then
        printf '+'; printf ' %q' "$@"; printf '\n'
    else
        "$@"
    fi
}

# Steps that need root and a real system; skipped when installing under --prefix.
system() {
    if [[ -n $PREFIX ]]; then
        printf '(--prefix: skipped)'; printf ' %q' "$@"; printf '\n'
    else
        run "$@"
    fi
}

detect_family() {
    [[ -n $FAMILY ]] && return
    local id_like=""
    [[ -r /etc/os-release ]] && id_like=$(. /etc/os-release && echo "${ID:-} ${ID_LIKE:-}")
    case " $id_like " in
        *" debian "* | *" ubuntu "*) FAMILY=debian ;;
        *" rhel "* | *" fedora "* | *" centos "*) FAMILY=rhel ;;
        *) die "unknown distribution ($id_like): pass --family debian or --family rhel" ;;
    esac
}

python_ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; }

choose_python() {
    [[ -n $PYTHON ]] && return
    if command -v python3.11 >/dev/null; then
        PYTHON=python3.11
    elif command -v python3 >/dev/null && python_ok python3; then
        PYTHON=python3
    else
        PYTHON=python3.11  # installed by the package step
    fi
}

install_packages() {
    [[ $PACKAGES == 1 ]] || { say "system packages: skipped (--no-packages)"; return; }
    say "system packages (from the distribution's repositories or a local mirror)"
    if [[ $FAMILY == debian ]]; then
        local python_pkgs=(python3.11 python3.11-venv)
        # Ubuntu 24.04 ships Python 3.12 as python3 and no python3.11 package.
        if [[ $PYTHON == python3 ]]; then python_pkgs=(python3-venv); fi
        system env DEBIAN_FRONTEND=noninteractive apt-get install -y "${python_pkgs[@]}" nginx sqlite3 curl openssl
    else
        system dnf install -y python3.11 nginx sqlite curl openssl policycoreutils
    fi
}

create_user() {
    say "system user $SERVICE_USER (no shell, home $APP)"
    if [[ -z $PREFIX ]] && id -u "$SERVICE_USER" >/dev/null 2>&1; then
        echo "    exists"
    else
        system useradd --system --shell /sbin/nologin --home-dir /opt/ai_platform --no-create-home "$SERVICE_USER"
    fi
}

# Ownership and mode of a path: the service user's own where it writes, root's elsewhere.
own() {
    local owner=$1 mode=$2 path=$3
    system chown "$owner" "$path"
    run chmod "$mode" "$path"
}

copy_project() {
    say "project files -> $APP (owned by root: the service cannot change its own code)"
    run mkdir -p "$APP"
    own root:root 0755 "$APP"
    # The project folder without development state; models, data, logs and .env are never touched.
    if [[ $DRY_RUN == 1 ]]; then
        run tar -C "$SOURCE" --exclude=... -cf - . "|" tar -C "$APP" -xf -
    else
        tar -C "$SOURCE" --exclude=./.git --exclude=./.venv --exclude=./.cache --exclude=./wheelhouse \
            --exclude=./models --exclude=./data --exclude=./logs --exclude=./.env \
            --exclude=./build --exclude=./dist --exclude='*.egg-info' --exclude=__pycache__ \
            --exclude=.pytest_cache --exclude=.mypy_cache --exclude=.ruff_cache -cf - . | tar -C "$APP" -xf -
    fi
}

create_venv() {
    say "virtual environment $VENV ($PYTHON), packages from $WHEELHOUSE (no network)"
    [[ $DRY_RUN == 1 || -d $WHEELHOUSE ]] \
        || die "no wheelhouse at $WHEELHOUSE: build one with deploy/build-wheelhouse.sh (see deploy/README.md)"
    [[ $DRY_RUN == 1 ]] || python_ok "$PYTHON" || die "$PYTHON is not Python 3.11+ (use --python)"
    [[ -x $VENV/bin/python ]] || run "$PYTHON" -m venv "$VENV"
    local pip=("$VENV/bin/pip" install --quiet --disable-pip-version-check --no-index --find-links "$WHEELHOUSE")
    run "${pip[@]}" --upgrade ai-platform "${PLUGINS[@]}"
    # Same version number, new build (e.g. a fix): replace the platform's own packages anyway.
    run "${pip[@]}" --force-reinstall --no-deps ai-platform "${PLUGINS[@]}"
}

new_secret() { "$PYTHON" -c 'import secrets; print(secrets.token_urlsafe(36))'; }

create_env() {
    local env_file="$APP/.env"
    say "settings $env_file (root-owned, readable by $SERVICE_USER only)"
    if [[ -e $env_file ]]; then
        echo "    exists: kept (keys unchanged)"
    elif [[ $DRY_RUN == 1 ]]; then
        run cp "$SOURCE/.env.example" "$env_file" "(with new SECRET_KEY, VALID_API_KEYS, ADMIN_API_KEYS)"
    else
        local secret client admin
        secret=$(new_secret) client="client-$(new_secret)" admin="admin-$(new_secret)"
        (umask 077 && sed -e "s|^SECRET_KEY=.*|SECRET_KEY=$secret|" \
            -e "s|^VALID_API_KEYS=.*|VALID_API_KEYS=[\"$client\"]|" \
            -e "s|^ADMIN_API_KEYS=.*|ADMIN_API_KEYS=[\"$admin\"]|" \
            "$SOURCE/.env.example" >"$env_file")
        echo "    new keys written; show them with: sudo grep API_KEYS $env_file"
    fi
    own "root:$SERVICE_USER" 0640 "$env_file"
}

create_dirs() {
    say "state directories: data and logs (service user, 0700), models (read-only for the service)"
    run mkdir -p "$APP/data" "$APP/logs" "$APP/models"
    own "$SERVICE_USER:$SERVICE_USER" 0700 "$APP/data"
    own "$SERVICE_USER:$SERVICE_USER" 0700 "$APP/logs"
    own "root:$SERVICE_USER" 0750 "$APP/models"
    local db
    for db in "$APP"/data/*.sqlite3; do
        [[ -e $db ]] && run chmod 0600 "$db"
    done
    return 0
}

# Copy a deploy/ file into place with this install's paths and server name.
render() {
    local from=$1 to=$2
    run mkdir -p "$(dirname "$to")"
    if [[ $DRY_RUN == 1 ]]; then
        run install -m 0644 "$from" "$to"
    else
        sed -e "s|/opt/ai_platform|$APP|g" -e "s|/etc/nginx/tls|$TLS|g" -e "s|ai-platform\.local|$SERVER_NAME|g" \
            "$from" >"$to.tmp"
        chmod 0644 "$to.tmp"
        mv "$to.tmp" "$to"
    fi
}

install_service() {
    say "systemd unit $UNIT"
    render "$SOURCE/deploy/systemd/ai-platform.service" "$UNIT"
    system systemctl daemon-reload
    system systemctl enable ai-platform
    system systemctl restart ai-platform
}

create_certificate() {
    say "TLS certificate $TLS/ai-platform.crt"
    if [[ -e $TLS/ai-platform.crt ]]; then
        echo "    exists: kept"
        return
    fi
    run mkdir -p "$TLS"
    run chmod 0755 "$TLS"
    echo "    self-signed for $SERVER_NAME; replace it with one from your internal CA (deploy/README.md)"
    run openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -sha256 -days 825 -nodes -subj "/CN=$SERVER_NAME" \
        -addext "subjectAltName=DNS:$SERVER_NAME" \
        -keyout "$TLS/ai-platform.key" -out "$TLS/ai-platform.crt"
    run chmod 0600 "$TLS/ai-platform.key"
}

install_nginx() {
    local conf
    if [[ $FAMILY == debian ]]; then
        conf="$PREFIX/etc/nginx/sites-available/ai-platform.conf"
        say "nginx site $conf (enabled; the default site disabled)"
        render "$SOURCE/deploy/nginx/ai-platform.conf" "$conf"
        run mkdir -p "$PREFIX/etc/nginx/sites-enabled"
        run ln -sfn ../sites-available/ai-platform.conf "$PREFIX/etc/nginx/sites-enabled/ai-platform.conf"
        run rm -f "$PREFIX/etc/nginx/sites-enabled/default"
    else
        conf="$PREFIX/etc/nginx/conf.d/ai-platform.conf"
        say "nginx configuration $conf"
        render "$SOURCE/deploy/nginx/ai-platform.conf" "$conf"
        if [[ -z $PREFIX ]] && command -v selinuxenabled >/dev/null && selinuxenabled; then
            say "SELinux: let nginx connect to the app; label the certificate"
            run setsebool -P httpd_can_network_connect 1
            run restorecon -R "$TLS"
        elif [[ $DRY_RUN == 1 ]]; then
            system setsebool -P httpd_can_network_connect 1
        fi
    fi
    system nginx -t
    system systemctl enable nginx
    system systemctl reload-or-restart nginx
}

main() {
    detect_family
    choose_python
    if [[ -z $PREFIX && $DRY_RUN == 0 && $(id -u) != 0 ]]; then
        die "run as root (sudo), or use --prefix DIR or --dry-run"
    fi
    say "AI Platform install: family $FAMILY, source $SOURCE, target $APP$([[ $DRY_RUN == 1 ]] && echo ', dry run')"
    install_packages
    create_user
    copy_project
    create_venv
    create_env
    create_dirs
    install_service
    create_certificate
    install_nginx
    say "done. Next: copy the models into $APP/models (deploy/README.md, 'Models'), then"
    say "  sudo systemctl restart ai-platform && curl -k https://$SERVER_NAME/health"
}

main
