#!/usr/bin/env bash
# Create or update the Modal secret `r2-secret` that the Stemset GPU worker reads its bucket
# credentials from (gpu_worker/modal_app.py).
#
# Reads from the environment, else from a .env file (ENV_FILE, default ./.env):
#   R2_ACCOUNT_ID          Cloudflare account id (the endpoint is https://<id>.r2.cloudflarestorage.com)
#   R2_ACCESS_KEY_ID       R2 API token's access key id
#   R2_SECRET_ACCESS_KEY   R2 API token's secret
#   R2_PUBLIC_URL          optional: the bucket's public base URL
#   GPU_WORKER_TOKEN       optional: bearer token for the Modal web endpoint (jobs over HTTP)
#
# The secret holds AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION=auto,
# STEMSET_S3_ENDPOINT_URL and the optional values. R2 speaks S3, hence the AWS_* names.
# Values go to `modal secret create --force r2-secret --from-json <file>` through a private
# temporary file, never on a command line (where `ps` would show them); nothing secret is printed.
#
# Options: SECRET_NAME (default r2-secret), MODAL (the modal command, default `modal`),
#          MODAL_ENVIRONMENT (passed as --env when set).
set -euo pipefail
set +x  # never trace: the values below are secrets

SECRET_NAME="${SECRET_NAME:-r2-secret}"
ENV_FILE="${ENV_FILE:-.env}"
MODAL_CMD="${MODAL:-modal}"

die() { printf 'error: %s\n' "$*" >&2; exit 1; }

mask() {  # the last four characters, only for values long enough to keep the rest hidden
  local v="$1"
  if [ "${#v}" -gt 8 ]; then printf '****%s' "${v: -4}"; else printf '****'; fi
}

# Read KEY=VALUE from the .env file without executing it (no `source`): comments, `export `,
# and single or double quotes around the value are understood.
dotenv_get() {
  local key="$1" line k v
  [ -f "$ENV_FILE" ] || return 1
  while IFS= read -r line || [ -n "$line" ]; do
    line="${line#"${line%%[![:space:]]*}"}"
    case "$line" in ''|'#'*) continue ;; esac
    line="${line#export }"
    k="${line%%=*}"
    [ "$k" = "$line" ] && continue
    k="${k%"${k##*[![:space:]]}"}"
    [ "$k" = "$key" ] || continue
    v="${line#*=}"
    v="${v#"${v%%[![:space:]]*}"}"
    v="${v%"${v##*[![:space:]]}"}"
    case "$v" in
      \"*\") v="${v#\"}"; v="${v%\"}" ;;
      \'*\') v="${v#\'}"; v="${v%\'}" ;;
    esac
    printf '%s' "$v"
    return 0
  done < "$ENV_FILE"
  return 1
}

get() {  # the environment wins over the .env file
  local key="$1"
  if [ -n "${!key:-}" ]; then printf '%s' "${!key}"; else dotenv_get "$key" || true; fi
}

R2_ACCOUNT_ID="$(get R2_ACCOUNT_ID)"
R2_ACCESS_KEY_ID="$(get R2_ACCESS_KEY_ID)"
R2_SECRET_ACCESS_KEY="$(get R2_SECRET_ACCESS_KEY)"
R2_PUBLIC_URL="$(get R2_PUBLIC_URL)"
GPU_WORKER_TOKEN="$(get GPU_WORKER_TOKEN)"

missing=()
[ -n "$R2_ACCOUNT_ID" ] || missing+=(R2_ACCOUNT_ID)
[ -n "$R2_ACCESS_KEY_ID" ] || missing+=(R2_ACCESS_KEY_ID)
[ -n "$R2_SECRET_ACCESS_KEY" ] || missing+=(R2_SECRET_ACCESS_KEY)
if [ "${#missing[@]}" -gt 0 ]; then
  where="the environment"
  [ -f "$ENV_FILE" ] && where="the environment or $ENV_FILE"
  die "${missing[*]} not set in $where. Export them (or put KEY=value lines in $ENV_FILE): they come from Cloudflare's dashboard, R2 > Manage API tokens."
fi
case "$R2_ACCOUNT_ID" in
  *[!A-Za-z0-9]*) die "R2_ACCOUNT_ID should be the Cloudflare account id (letters and digits only), not a URL." ;;
esac

command -v "$MODAL_CMD" >/dev/null 2>&1 \
  || die "the \`$MODAL_CMD\` command was not found. Activate Stemset's virtualenv (. .venv/bin/activate) or pip install modal, then run \`modal token new\`."

PYTHON="${PYTHON:-$(command -v python3 || command -v python || true)}"
[ -n "$PYTHON" ] || die "python3 is needed to write the secret file."

tmpdir="$(mktemp -d)"
trap 'rm -rf "$tmpdir"' EXIT
chmod 700 "$tmpdir"
json="$tmpdir/secret.json"
(
  umask 077
  # Values travel to python in its environment, not on its command line.
  R2_ACCOUNT_ID="$R2_ACCOUNT_ID" R2_ACCESS_KEY_ID="$R2_ACCESS_KEY_ID" R2_SECRET_ACCESS_KEY="$R2_SECRET_ACCESS_KEY" \
  R2_PUBLIC_URL="$R2_PUBLIC_URL" GPU_WORKER_TOKEN="$GPU_WORKER_TOKEN" OUT="$json" "$PYTHON" - <<'PY'
import json, os
env = os.environ
secret = {
    "AWS_ACCESS_KEY_ID": env["R2_ACCESS_KEY_ID"],
    "AWS_SECRET_ACCESS_KEY": env["R2_SECRET_ACCESS_KEY"],
    "AWS_REGION": "auto",
    "STEMSET_S3_ENDPOINT_URL": f"https://{env['R2_ACCOUNT_ID']}.r2.cloudflarestorage.com",
}
if env.get("R2_PUBLIC_URL"):
    secret["R2_PUBLIC_URL"] = env["R2_PUBLIC_URL"]
if env.get("GPU_WORKER_TOKEN"):
    secret["GPU_WORKER_TOKEN"] = env["GPU_WORKER_TOKEN"]
with open(env["OUT"], "w") as fh:
    json.dump(secret, fh)
PY
)

keys="AWS_ACCESS_KEY_ID=$(mask "$R2_ACCESS_KEY_ID"), AWS_SECRET_ACCESS_KEY=****, AWS_REGION=auto, STEMSET_S3_ENDPOINT_URL=https://$(mask "$R2_ACCOUNT_ID").r2.cloudflarestorage.com"
[ -n "$R2_PUBLIC_URL" ] && keys="$keys, R2_PUBLIC_URL=$R2_PUBLIC_URL"
[ -n "$GPU_WORKER_TOKEN" ] && keys="$keys, GPU_WORKER_TOKEN=****"
echo "Creating/updating Modal secret '$SECRET_NAME': $keys"

args=(secret create --force "$SECRET_NAME" --from-json "$json")
[ -n "${MODAL_ENVIRONMENT:-}" ] && args+=(--env "$MODAL_ENVIRONMENT")
if ! "$MODAL_CMD" "${args[@]}"; then
  die "\`modal secret create\` failed. Is this machine logged in to Modal? Run \`modal token new\` and try again."
fi
echo "Done. Deploy the worker with: modal deploy gpu_worker/modal_app.py"
