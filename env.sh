# The environment of mip: source it before running the server, mipper or the tests.
#     source env.sh
# Every value below is a default for the demo; set a variable before sourcing to override it.

MIP_HOME=$(cd "$(dirname "${BASH_SOURCE[0]:-$0}")" && pwd)
export MIP_HOME

# The venv `make` builds goes first on PATH (once), so that `python mipper.py ...` and the
# docs' other commands run with the requirements installed.
if [ -d "$MIP_HOME/.venv/bin" ]; then
    case ":$PATH:" in
        *":$MIP_HOME/.venv/bin:"*) ;;
        *) export PATH="$MIP_HOME/.venv/bin:$PATH" ;;
    esac
fi

# Folders, as the original TA1 system's envvars.sh names them.
export TA1_INPUTS_DIR=${TA1_INPUTS_DIR:-$MIP_HOME/data/inputs}     # maps: inputs/maps/<map>/<map>.tif
export TA1_OUTPUTS_DIR=${TA1_OUTPUTS_DIR:-$MIP_HOME/data/outputs}  # outputs/<job>/<module>/
export TA1_TEMPS_DIR=${TA1_TEMPS_DIR:-$MIP_HOME/data/temps}        # temps/<job>/<module>/
export TA1_RUNS_DIR=${TA1_RUNS_DIR:-$MIP_HOME/data/runs}           # journal.db and run logs
export TA1_REPOS_DIR=${TA1_REPOS_DIR:-$MIP_HOME/data/repos}        # module source trees ($REPO_DIR)

# The pipeline.
export MIP_CONFIG=${MIP_CONFIG:-$MIP_HOME/config.yml}   # the module catalogue
export MIP_WORKERS=${MIP_WORKERS:-4}                    # modules run in parallel inside one run
# MIP_OPENAI_KEY: default OpenAI key handed to modules as OPENAI_API_KEY (unset by default).

# The server.
export MIP_HOST=${MIP_HOST:-127.0.0.1}    # address to bind; keep loopback unless behind a proxy
export MIP_PORT=${MIP_PORT:-8080}
export MIP_MAX_RUNS=${MIP_MAX_RUNS:-2}    # runs executing at once (runs of one job never overlap)
export MIP_MAX_QUEUED=${MIP_MAX_QUEUED:-200}  # runs waiting to start; more are refused (503)
export MIP_THREADS=${MIP_THREADS:-8}      # request threads
# POST /runs (and rerun) answer 507 while the runs, outputs or temps folder has less free
# space than this, in MB: a real module writes hundreds of MB, and a run needs room to
# record its end.
export MIP_MIN_FREE_MB=${MIP_MIN_FREE_MB:-1024}
# MIP_KEY_FILE: the key that seals a queued run's OpenAI key in the journal; made
# (random, owner-only) at first start; default $TA1_RUNS_DIR/keystore.key.
# MIP_MAX_DOWNLOADS: zip downloads sent at once (default half of MIP_THREADS, at most
# MIP_THREADS - 1); one more gets 503 with Retry-After.
export MIP_AUTH_FAILURES=${MIP_AUTH_FAILURES:-10}  # wrong credentials a minute per address, then 429
# Basic auth: MIP_USER with MIP_PASSWORD, or MIP_USERS_FILE (lines user:hash, see
# `python mip_server.py --hash-password`). With neither, the demo keeps a random password,
# made once, in .mip_password (owner-only, git-ignored): MIP_PASSWORD_FILE.
export MIP_USER=${MIP_USER:-mip}
if [ -z "${MIP_PASSWORD:-}" ] && [ -z "${MIP_USERS_FILE:-}" ]; then
    export MIP_PASSWORD_FILE=${MIP_PASSWORD_FILE:-$MIP_HOME/.mip_password}
fi

# Copy each passed module's outputs and logs to S3 (off while MIP_S3_BUCKET is unset).
# Credentials and region come from the usual AWS variables and files; AWS_ENDPOINT_URL
# points at an S3-compatible store.
# export MIP_S3_BUCKET=my-bucket
export MIP_S3_PREFIX=${MIP_S3_PREFIX:-mip}   # keys: <prefix>/<job>/<module>/{outputs,logs,temps}/...
export MIP_S3_TEMPS=${MIP_S3_TEMPS:-0}       # 1: copy temps too
