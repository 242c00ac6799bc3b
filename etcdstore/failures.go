package etcdstore

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/granary-build/granary/core"
	"github.com/granary-build/granary/internal/keys"
)

// Failure memory. The record of a running attempt (P/build/<id>) lives on
// its builder's lease, so it vanishes as soon as the builder's process
// ends. A failed attempt therefore also leaves P/failed/<id>, on a lease of
// its own whose TTL is the retention (WithFailureRetention, default a day)
// and which nobody keeps alive: etcd deletes the record when the retention
// is over, whoever is still running. A newer failure replaces the record
// (and revokes the old record's lease); a publish leaves it, so `inspect`
// can still say that earlier attempts failed.
//
// The logs of failed attempts stay in the package's logging directory, one
// file (or more) per attempt; a new attempt keeps the newest
// WithKeptLogs-1 files and moves older ones to the trash.

// Defaults of failure memory.
const (
	DefaultFailureRetention = 24 * time.Hour
	DefaultKeptLogs         = 10
)

// FailureRecord is the value of P/failed/<id>: the last failed attempt.
type FailureRecord struct {
	Host    string    `json:"host"`
	PID     int       `json:"pid"`
	Started time.Time `json:"started"`
	Ended   time.Time `json:"ended"`
	// Attempt is the fencing token (lock revision) of the attempt. Number
	// counts the failures of the package since there was no record (1 for
	// the first): each failure while a record lives adds one. A publish in
	// between does not reset it.
	Attempt int64  `json:"attempt"`
	Number  int    `json:"number"`
	Error   string `json:"error"`
	// ExitCode is the builder process's exit code when the builder's error
	// wraps an *exec.ExitError, or another error with its ExitCode and Sys
	// methods (-1 when it was killed by a signal, named in Signal).
	ExitCode *int   `json:"exit_code,omitempty"`
	Signal   string `json:"signal,omitempty"`
	Panic    bool   `json:"panic,omitempty"`
	LogDir   string `json:"log_dir"`
	// Logs are the files the attempt wrote in LogDir (modified since it
	// started), oldest first.
	Logs []string `json:"logs,omitempty"`
	// Expires is when etcd drops the record.
	Expires time.Time `json:"expires"`
}

// recordFailure keeps what is known of a failed attempt for the retention
// period: it is called by the attempt's failure path (build.go's failed),
// after the lock is released, with the attempt's record and its error. An
// abandoned or cancelled attempt leaves no record. Errors are logged, not
// returned: the build's own error is what the caller must see.
func (s *Store) recordFailure(ctx context.Context, id string, rec BuildRecord, cause error) {
	if errors.Is(cause, context.Canceled) || errors.Is(cause, context.DeadlineExceeded) || errors.Is(cause, ErrAbandon) {
		return
	}
	if err := s.putFailure(context.WithoutCancel(ctx), id, rec, cause); err != nil {
		s.opt.logger.Warn("cannot record the failed attempt", "id", id, "err", err)
	}
}

func (s *Store) putFailure(ctx context.Context, id string, rec BuildRecord, cause error) error {
	now := time.Now()
	fr := FailureRecord{
		Host: rec.Host, PID: rec.PID, Started: rec.Started, Ended: now, Attempt: rec.Attempt, Number: 1,
		Error: cause.Error(), LogDir: rec.LogDir, Expires: now.Add(s.opt.failureRetention),
	}
	// The first process status in the chain: an *exec.ExitError, or an
	// error that reports another process's status with the same methods
	// (a builder's, under a guard that only exits with a code).
	var xe interface {
		ExitCode() int
		Sys() any
	}
	if errors.As(cause, &xe) {
		code := xe.ExitCode()
		fr.ExitCode = &code
		if ws, ok := xe.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			fr.Signal = ws.Signal().String()
		}
	}
	var pe *PanicError
	if errors.As(cause, &pe) {
		fr.Panic = true
		// The stack goes to the log, and to a file next to the attempt's
		// other logs, not into the error message.
		s.opt.logger.Error("builder panicked", "id", id, "panic", fmt.Sprint(pe.Value), "stack", string(pe.Stack))
		p := filepath.Join(rec.LogDir, "panic-"+now.UTC().Format("20060102T150405.000")+".log")
		if err := os.WriteFile(p, fmt.Appendf(nil, "builder of %s panicked: %v\n\n%s", id, pe.Value, pe.Stack), 0o644); err != nil {
			s.opt.logger.Warn("cannot write the panic's stack to the logs", "id", id, "err", err)
		}
	}
	fr.Logs = attemptLogs(rec.LogDir, rec.Started)

	prev, prevLease, err := s.lastFailure(ctx, id)
	if err != nil {
		return err
	}
	if prev != nil && prev.Attempt != fr.Attempt {
		fr.Number = prev.Number + 1
	}
	cctx, cancel := s.opCtx(ctx)
	defer cancel()
	ttl := int64(s.opt.failureRetention / time.Second)
	lease, err := s.cli.Grant(cctx, max(ttl, 1))
	if err != nil {
		return fmt.Errorf("grant the failure record's lease: %w", err)
	}
	// Last writer wins: failures of one package are serialised by its
	// lock, so the only race is with a Drop, which may lose.
	if _, err := s.cli.Put(cctx, s.keys.FailedKey(id), mustJSON(fr), clientv3.WithLease(lease.ID)); err != nil {
		s.cli.Revoke(cctx, lease.ID) //nolint:errcheck // it expires anyway
		return fmt.Errorf("put the failure record: %w", err)
	}
	if prevLease != 0 && prevLease != lease.ID {
		s.cli.Revoke(cctx, prevLease) //nolint:errcheck // it held only the record we replaced; it expires anyway
	}
	return nil
}

// attemptLogs lists the regular files of dir modified since started (with
// 10 ms of slack for file system clocks), oldest first.
func attemptLogs(dir string, started time.Time) []string {
	type logFile struct {
		path string
		mod  time.Time
	}
	var files []logFile
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		info, err := e.Info()
		if err != nil || !info.Mode().IsRegular() || info.ModTime().Before(started.Add(-10*time.Millisecond)) {
			continue
		}
		files = append(files, logFile{filepath.Join(dir, e.Name()), info.ModTime()})
	}
	slices.SortFunc(files, func(a, b logFile) int {
		return cmp.Or(a.mod.Compare(b.mod), strings.Compare(a.path, b.path))
	})
	out := make([]string, len(files))
	for i, f := range files {
		out[i] = f.path
	}
	return out
}

// LastFailure returns the record of the last failed attempt at package id
// still within its retention, or nil when there is none.
func (s *Store) LastFailure(ctx context.Context, id string) (*FailureRecord, error) {
	if err := core.ValidateID(id); err != nil {
		return nil, fmt.Errorf("last failure: %w", err)
	}
	fr, _, err := s.lastFailure(ctx, id)
	if err != nil {
		return nil, fmt.Errorf("last failure of %q: %w", id, err)
	}
	return fr, nil
}

func (s *Store) lastFailure(ctx context.Context, id string) (*FailureRecord, clientv3.LeaseID, error) {
	cctx, cancel := s.opCtx(ctx)
	defer cancel()
	resp, err := s.cli.Get(cctx, s.keys.FailedKey(id))
	if err != nil {
		return nil, 0, err
	}
	if len(resp.Kvs) == 0 {
		return nil, 0, nil
	}
	fr, err := decode[FailureRecord](resp.Kvs[0].Value)
	if err != nil {
		return nil, 0, err
	}
	return fr, clientv3.LeaseID(resp.Kvs[0].Lease), nil
}

// Failures returns the failure records of every package, by ID.
func (s *Store) Failures(ctx context.Context) (map[string]*FailureRecord, error) {
	out := map[string]*FailureRecord{}
	err := s.scan(ctx, keys.Failed, false, func(id string, kv *mvccpb.KeyValue) error {
		if fr, err := decode[FailureRecord](kv.Value); err == nil {
			out[id] = fr
		}
		return nil // a corrupt record is skipped, not fatal to a listing
	})
	if err != nil {
		return nil, fmt.Errorf("failures: %w", err)
	}
	return out, nil
}

// DropFailures deletes the failure records that ended more than olderThan
// ago (all of them for 0) and revokes their leases; with dryRun it only
// says which. It returns the IDs concerned, sorted.
//
// It also deletes the failed attempts' own records (P/build/<id> in state
// failed), which live as long as their builder's lease: a node builds for
// its host's jobs, so without this a package would stay "failed" in List
// and Inspect until the node restarts. Those records are there to tell the
// attempt's waiters, which have been told by the time the record exists;
// one is deleted only if unchanged since read, so a new attempt's record
// is never touched.
func (s *Store) DropFailures(ctx context.Context, olderThan time.Duration, dryRun bool) ([]string, error) {
	now := time.Now()
	vs, err := s.oldFailures(ctx, now, olderThan)
	if err != nil {
		return nil, fmt.Errorf("drop failures: %w", err)
	}
	attempts, err := s.oldFailedAttempts(ctx, now, olderThan, vs)
	if err != nil {
		return nil, fmt.Errorf("drop failures: %w", err)
	}
	ids, err := s.dropFailureRecords(ctx, vs, dryRun)
	if err != nil {
		return ids, err
	}
	if ids, err = s.dropFailedAttempts(ctx, attempts, dryRun, ids); err != nil {
		return ids, err
	}
	slices.Sort(ids)
	return ids, nil
}

// failureVictim is a record DropFailures deletes: a failure record (with
// its lease) or a failed attempt's record, at the revision it was read.
type failureVictim struct {
	id    string
	rev   int64
	lease clientv3.LeaseID
}

// oldFailures lists the failure records that ended at least olderThan
// before now (and those that do not decode).
func (s *Store) oldFailures(ctx context.Context, now time.Time, olderThan time.Duration) ([]failureVictim, error) {
	var vs []failureVictim
	err := s.scan(ctx, keys.Failed, false, func(id string, kv *mvccpb.KeyValue) error {
		if fr, err := decode[FailureRecord](kv.Value); err == nil && now.Sub(fr.Ended) < olderThan {
			return nil
		}
		vs = append(vs, failureVictim{id, kv.ModRevision, clientv3.LeaseID(kv.Lease)})
		return nil
	})
	return vs, err
}

// oldFailedAttempts lists the failed attempts' records to delete with the
// failures dropped (vs).
func (s *Store) oldFailedAttempts(ctx context.Context, now time.Time, olderThan time.Duration, vs []failureVictim) ([]failureVictim, error) {
	// The failed attempts' records: those of the failures dropped here,
	// and those whose failure record is already gone (expired, or never
	// written) if they started more than olderThan ago.
	dropped := map[string]bool{}
	for _, v := range vs {
		dropped[v.id] = true
	}
	kept := map[string]bool{}
	err := s.scan(ctx, keys.Failed, true, func(id string, _ *mvccpb.KeyValue) error {
		kept[id] = !dropped[id]
		return nil
	})
	if err != nil {
		return nil, err
	}
	var attempts []failureVictim
	err = s.scan(ctx, keys.Build, false, func(id string, kv *mvccpb.KeyValue) error {
		b, err := decode[BuildRecord](kv.Value)
		if err != nil || b.State != BuildFailed || kept[id] {
			return nil
		}
		if dropped[id] || now.Sub(b.Started) >= olderThan {
			attempts = append(attempts, failureVictim{id: id, rev: kv.ModRevision})
		}
		return nil
	})
	return attempts, err
}

// dropFailureRecords deletes the failure records vs (unless dryRun) and
// revokes their leases; it returns the IDs of those it deleted (all of
// them with dryRun).
func (s *Store) dropFailureRecords(ctx context.Context, vs []failureVictim, dryRun bool) ([]string, error) {
	ids := []string{}
	for _, v := range vs {
		if !dryRun {
			cctx, cancel := s.opCtx(ctx)
			resp, err := s.cli.Txn(cctx).
				If(clientv3.Compare(clientv3.ModRevision(s.keys.FailedKey(v.id)), "=", v.rev)). // not replaced by a newer failure meanwhile
				Then(clientv3.OpDelete(s.keys.FailedKey(v.id))).
				Commit()
			if err == nil && resp.Succeeded && v.lease != 0 {
				s.cli.Revoke(cctx, v.lease) //nolint:errcheck // it held only this record; it expires anyway
			}
			cancel()
			if err != nil {
				return ids, fmt.Errorf("drop failure of %q: %w", v.id, err)
			}
			if !resp.Succeeded {
				continue
			}
		}
		ids = append(ids, v.id)
	}
	return ids, nil
}

// dropFailedAttempts deletes the failed attempts' records (unless dryRun)
// and adds the IDs of those it deleted to ids.
func (s *Store) dropFailedAttempts(ctx context.Context, attempts []failureVictim, dryRun bool, ids []string) ([]string, error) {
	for _, v := range attempts {
		if !dryRun {
			cctx, cancel := s.opCtx(ctx)
			resp, err := s.cli.Txn(cctx).
				If(clientv3.Compare(clientv3.ModRevision(s.keys.BuildKey(v.id)), "=", v.rev)). // still the failed attempt's: no new attempt claimed it
				Then(clientv3.OpDelete(s.keys.BuildKey(v.id))).
				Commit()
			cancel()
			if err != nil {
				return ids, fmt.Errorf("drop the failed attempt of %q: %w", v.id, err)
			}
			if !resp.Succeeded {
				continue
			}
		}
		if !slices.Contains(ids, v.id) {
			ids = append(ids, v.id)
		}
	}
	return ids, nil
}

// pruneLogs runs before a new attempt writes its logs: it keeps the newest
// keptLogs-1 files of the package's logging directory, so that with the new
// attempt's log there are keptLogs, and moves older ones to the trash.
func (s *Store) pruneLogs(id string) {
	dir := s.logDir(id)
	all := attemptLogs(dir, time.Time{})
	keep := max(s.opt.keptLogs-1, 0)
	if len(all) <= keep {
		return
	}
	for _, p := range all[:len(all)-keep] {
		if err := s.moveToTrash(p); err != nil {
			s.opt.logger.Warn("cannot trash an old build log", "id", id, "path", p, "err", err)
		}
	}
}
