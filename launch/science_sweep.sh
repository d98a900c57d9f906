#!/bin/bash
# Start (or resume) the science sweep in the background, detached from this shell: the whole set of
# sweeps/science.yaml, JOBS training processes at a time, niced, results and log outside the
# checkout. Finished runs are never redone, so after a reboot or a kill the same command continues.
#
# Usage: launch/science_sweep.sh [start|status|stop|report|archive]   (default: start)
#   Run it from a checkout, ideally a frozen one: mkdir DIR && git archive HEAD | tar -x -C DIR
#
# Examples:
#   launch/science_sweep.sh            # start or resume; prints the PID and where the log goes
#   launch/science_sweep.sh status     # runs finished / pending, and whether the sweep is running
#   launch/science_sweep.sh stop       # stop it (running runs are redone on resume)
#   launch/science_sweep.sh report     # (partial) report into $REPORT_DIR, from the run folders
#   launch/science_sweep.sh archive    # $REPORT_DIR/runs_summary.jsonl + runs_archive.json, $ARCHIVE
#
# Environment [default] (relative paths are from the checkout; keep RESULTS and ARCHIVE outside it):
#   RESULTS [../hyperp_science/results]   LOG [$RESULTS/../sweep.log]   JOBS [2]   NICE [10]
#   SPEC [sweeps/science.yaml]   PYTHON [.venv/bin/python]   REPORT_DIR [bench/results/science]
#   ARCHIVE [$RESULTS/../science_runs.tar.gz]
set -euo pipefail

cd "$(dirname "$0")/.."
RESULTS="${RESULTS:-../hyperp_science/results}"
LOG="${LOG:-$(dirname "${RESULTS}")/sweep.log}"
JOBS="${JOBS:-2}"
NICE="${NICE:-10}"
SPEC="${SPEC:-sweeps/science.yaml}"
PYTHON="${PYTHON:-.venv/bin/python}"
REPORT_DIR="${REPORT_DIR:-bench/results/science}"
ARCHIVE="${ARCHIVE:-$(dirname "${RESULTS}")/science_runs.tar.gz}"
PID_FILE="${RESULTS}/sweep.pid"

running() { [[ -f "${PID_FILE}" ]] && kill -0 "$(cat "${PID_FILE}")" 2>/dev/null; }

case "${1:-start}" in
  start)
    mkdir -p "${RESULTS}"
    if running; then
        echo "already running: PID $(cat "${PID_FILE}"), log ${LOG}"
        exit 0
    fi
    sweep_args=(run --spec "${SPEC}" --results "${RESULTS}" --jobs "${JOBS}")
    echo "[science_sweep] $(date -Is) start in $(pwd) at $(git rev-parse HEAD 2>/dev/null || echo '?')" >> "${LOG}"
    setsid nohup nice -n "${NICE}" "${PYTHON}" -m hyperp_megatron.science sweep "${sweep_args[@]}" >> "${LOG}" 2>&1 < /dev/null &
    echo $! > "${PID_FILE}"
    echo "started: PID $!, results ${RESULTS}, log ${LOG}"
    ;;
  status)
    "${PYTHON}" -m hyperp_megatron.science sweep status --spec "${SPEC}" --results "${RESULTS}"
    if running; then echo "running: PID $(cat "${PID_FILE}")"; else echo "not running"; fi
    tail -n 1 "${LOG}" 2>/dev/null || true
    ;;
  stop)
    if running; then kill -TERM "$(cat "${PID_FILE}")" && echo "stopping PID $(cat "${PID_FILE}")"; else echo "not running"; fi
    ;;
  report)
    "${PYTHON}" -m hyperp_megatron.science fit --spec "${SPEC}" --results "${RESULTS}" --out "${REPORT_DIR}"
    ;;
  archive)
    "${PYTHON}" -m hyperp_megatron.science sweep archive --spec "${SPEC}" --results "${RESULTS}" --out "${REPORT_DIR}" \
        --archive "${ARCHIVE}"
    ;;
  *)
    echo "usage: $0 [start|status|stop|report|archive]" >&2
    exit 2
    ;;
esac
