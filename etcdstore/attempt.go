package etcdstore

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"syscall"
	"time"

	"github.com/cenkalti/backoff/v4"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/granary-build/granary/core"
)

// attempt is one build attempt of this store while it holds the package's
// lock. Its methods are the steps of BuildOutcome's protocol, in order:
// claim, prepare (clear leftovers), produce (cache or builder), seal,
// publish; fail ends an attempt at any step after claim.
type attempt struct {
	s         *Store
	id        string
	ls        *Lease
	l         *lock
	startRev  int64     // revision the wait started from
	waitStart time.Time // when the wait started
	// sawRunning: the wait began with another attempt running, so a
	// package found published under the lock came from that attempt.
	sawRunning bool
	needs      []core.Need // the packages the build needs, held by its callers (needs.go)

	rec      BuildRecord // our record in P/build/<id>
	buildRev int64       // its revision, which publish requires unchanged
	started  time.Time
}

// run performs the attempt and releases the lock.
func (a *attempt) run(ctx context.Context, builder func(context.Context) error) (Outcome, error) {
	defer a.l.release()
	s := a.s
	st, err := s.readState(ctx, a.id)
	if err != nil {
		return Outcome{}, err
	}
	if st.avail != nil && st.invalid != nil {
		return Outcome{}, &invalidWait{rev: st.rev, rec: st.invalid}
	}
	if st.avail != nil { // published by the holder before us
		out := Outcome{How: AlreadyAvailable, Package: st.avail, LogDir: s.logDir(a.id)}
		if a.l.queued || a.sawRunning {
			out.How, out.Waited = Waited, time.Since(a.waitStart)
		}
		return out, nil
	}
	if b := st.build; b != nil && b.State == BuildFailed {
		if st.buildModRev > a.startRev {
			// The attempt we were waiting on failed just before we got the
			// lock: report it rather than retry the same broken build.
			return Outcome{}, failedAttempt(a.id, b)
		}
		s.emit(Event{Kind: EventLastFailed, ID: a.id, Host: b.Host, PID: b.PID, Since: b.Started, LogDir: b.LogDir, Err: errors.New(b.Error)})
	}
	if err := a.claim(ctx); err != nil {
		return Outcome{}, err
	}
	if err := a.prepare(ctx); err != nil {
		return Outcome{}, a.fail(ctx, err)
	}
	how, err := a.produce(ctx, builder)
	if err != nil {
		return Outcome{}, a.fail(ctx, err)
	}
	pkg, err := a.seal(how)
	if err != nil {
		return Outcome{}, a.fail(ctx, fmt.Errorf("seal output: %w", err))
	}
	if err := a.publish(ctx, pkg); err != nil {
		if errors.Is(err, ErrFenced) {
			// Someone else holds the lock now and owns the tree; leave it.
			return Outcome{}, &BuildError{ID: a.id, Host: s.opt.host, PID: s.pid, LogDir: a.rec.LogDir, Err: err}
		}
		return Outcome{}, a.fail(ctx, err)
	}
	s.emit(Event{Kind: EventPublished, ID: a.id, Host: s.opt.host, PID: s.pid, Since: a.rec.Started, LogDir: a.rec.LogDir,
		Elapsed: time.Since(a.started), Size: pkg.Size, Digest: pkg.Digest})
	s.storeCache(ctx, a.id, pkg)
	return Outcome{How: how, Package: &pkg, LogDir: a.rec.LogDir}, nil
}

// claim records the attempt on our lease, only while we own the lock. The
// record's deletion (lease expiry) tells waiters this attempt died.
func (a *attempt) claim(ctx context.Context) error {
	s := a.s
	a.rec = BuildRecord{State: BuildRunning, Host: s.opt.host, PID: s.pid, Started: time.Now(), LogDir: s.logDir(a.id), Attempt: a.l.rev}
	if p, ok := ctx.Value(builderProcessKey{}).(BuilderProcess); ok && p.PID > 0 {
		a.rec.PID, a.rec.Command = p.PID, p.Command // the caller's process runs the builder
	}
	val := mustJSON(a.rec)
	cctx, cancel := s.opCtx(ctx)
	resp, err := s.cli.Txn(cctx).
		If(a.l.isOwner()). // only the lock owner may claim the attempt
		Then(clientv3.OpPut(s.keys.BuildKey(a.id), val, clientv3.WithLease(a.ls.ID))).
		Commit()
	cancel()
	if err == nil {
		if !resp.Succeeded {
			return fmt.Errorf("%w: lock lost before the build started", ErrLeaseLost)
		}
		a.buildRev = resp.Header.Revision
		return nil
	}
	// Ambiguous: read back whether our record is there.
	rctx, rcancel := s.opCtx(ctx)
	got, rerr := s.cli.Get(rctx, s.keys.BuildKey(a.id))
	rcancel()
	if rerr == nil && len(got.Kvs) == 1 && string(got.Kvs[0].Value) == val {
		a.buildRev = got.Kvs[0].ModRevision
		return nil
	}
	return errors.Join(err, rerr)
}

// prepare creates a fresh, empty output directory and the logging
// directory (logs of earlier attempts stay).
//
// It never trusts this host's cached view of the shared root: it opens the
// parents first (on NFS, opening a directory revalidates it and its cached
// entries) and creates the output directory with an exclusive mkdir, which
// the file server decides. An output directory that exists is a leftover
// of an attempt that did not end cleanly (a clean failure and a removal
// move it to the trash under the lock): its builder may be frozen rather
// than dead, so it gets the lock delay to notice its lost lease before the
// tree is moved aside, never deleted in place.
func (a *attempt) prepare(ctx context.Context) error {
	s := a.s
	out := s.outputDir(a.id)
	delayed := false
	for try := 1; ; try++ {
		revalidate(s.pkgsDir(), s.pkgDir(a.id))
		err := os.Mkdir(out, 0o755)
		switch {
		case err == nil:
			s.pruneLogs(a.id) // keep the newest WithKeptLogs-1 logs of earlier attempts
			// Not MkdirAll: its stat trusts this host's cache.
			if err := os.Mkdir(s.logDir(a.id), 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
				return err
			}
			return nil
		case errors.Is(err, fs.ErrNotExist):
			// The package directory is missing (or this host thought it
			// was there): create it and try again. An exclusive mkdir
			// asks the server; MkdirAll would stat first and believe a
			// stale cached entry of a directory another host removed.
			if err := os.Mkdir(s.pkgDir(a.id), 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
				if !errors.Is(err, fs.ErrNotExist) {
					return err
				}
				if err := os.MkdirAll(s.pkgsDir(), 0o755); err != nil {
					return err
				}
			}
		case errors.Is(err, fs.ErrExist):
			if !delayed {
				s.emit(Event{Kind: EventLockDelay, ID: a.id, Elapsed: s.opt.lockDelay, Host: s.opt.host, PID: s.pid})
				s.opt.logger.Info("moving leftovers of an unfinished attempt aside after the lock delay", "id", a.id, "delay", s.opt.lockDelay)
				select {
				case <-time.After(s.opt.lockDelay):
				case <-ctx.Done():
					return ctx.Err()
				}
				delayed = true
			}
			if err := s.moveToTrash(out); err != nil {
				return err
			}
		default:
			return err
		}
		if try == 5 {
			return fmt.Errorf("cannot create a fresh %s (this host's view of the shared root may be stale): %w", out, err)
		}
	}
}

// revalidate opens each directory and closes it again: on NFS that is how
// a client revalidates a directory and drops its stale cached entries
// (close-to-open). Errors are for the caller's next step to find.
func revalidate(dirs ...string) {
	for _, d := range dirs {
		if f, err := os.OpenFile(d, os.O_RDONLY|syscall.O_DIRECTORY, 0); err == nil {
			f.Close()
		}
	}
}

// produce fills the output directory from the remote cache or by running
// the builder, with a context that ends when ctx ends or our lease is in
// doubt.
func (a *attempt) produce(ctx context.Context, builder func(context.Context) error) (How, error) {
	s := a.s
	a.started = time.Now()
	fromCache, err := s.fetchCache(ctx, a.ls, a.id)
	if err != nil || fromCache {
		return FromCache, err
	}
	s.emit(Event{Kind: EventBuilding, ID: a.id, Host: s.opt.host, PID: s.pid, Since: a.rec.Started, LogDir: a.rec.LogDir})
	bctx, stop := mergeCancel(ctx, a.ls.ctx)
	defer stop()
	if a.needs != nil {
		bctx = core.WithNeeds(bctx, a.needs)
	}
	err = runBuilder(bctx, builder)
	switch cause := stopCause(bctx, a.ls); {
	case cause == nil:
	case err == nil:
		err = cause // the builder ignored its cancellation
	case !errors.Is(err, cause):
		// Say why the builder was stopped ("signal: killed" alone does not
		// tell a lost lease from a crash).
		err = fmt.Errorf("%w (builder stopped: %w)", err, cause)
	}
	return Built, err
}

// runBuilder calls builder, turning a panic into an error.
func runBuilder(ctx context.Context, builder func(context.Context) error) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = recovered(r) // one line; the stack goes to the log (recordFailure)
		}
	}()
	return builder(ctx)
}

// stopCause says why work merged from ctx and the lease's context must
// stop, or nil. It asks the lease directly: the merged context learns of
// the lease's end a moment later, from another goroutine.
func stopCause(ctx context.Context, l *Lease) error {
	if ctx.Err() != nil {
		return context.Cause(ctx)
	}
	return l.Err()
}

// seal makes the tree read-only, records its size and digest, and flushes
// it to the file server.
func (a *attempt) seal(how How) (PackageRecord, error) {
	s := a.s
	out := s.outputDir(a.id)
	digest, size, err := s.sealPackage(a.id) // sealTree with EventSealing progress
	if err == nil {
		err = syncTree(out)
	}
	var entries int
	if err == nil {
		// What another host checks to tell its stale listing from the
		// published tree (awaitVisible).
		entries, err = topEntries(out)
	}
	if err != nil {
		return PackageRecord{}, err
	}
	return PackageRecord{
		BuiltBy: s.opt.host, PID: s.pid, BuiltAt: time.Now().UTC(), BuildSeconds: time.Since(a.started).Seconds(),
		Size: size, Digest: digest, FromCache: how == FromCache, Attempt: a.l.rev, Entries: entries,
		Needs: needIDs(a.needs),
	}, nil
}

// publish makes the package available in one Txn that holds only while we
// own the lock and our attempt record is the one we wrote: a builder that
// lost its lock (lease expired while it was frozen) cannot publish.
func (a *attempt) publish(ctx context.Context, pkg PackageRecord) error {
	s, id, l := a.s, a.id, a.l
	val := mustJSON(pkg)
	now := time.Now()
	var errs []error
	cmps := append([]clientv3.Cmp{
		l.isOwner(), // fencing: we still hold the build lock
		clientv3.Compare(clientv3.ModRevision(s.keys.BuildKey(id)), "=", a.buildRev), // and our attempt record stands
	}, s.needCmps(pkg.Needs)...) // every need is still published and valid (needs.go)
	ops := append([]clientv3.Op{
		clientv3.OpPut(s.keys.AvailKey(id), val),              // available, for good (no lease)
		clientv3.OpPut(s.keys.ATimeKey(id), formatNanos(now)), // fresh packages are not pruned first
		clientv3.OpDelete(s.keys.BuildKey(id)),                // the attempt is over
		l.releaseOp(),                                         // and so is our hold on the lock
	}, s.needOps(id, pkg.Needs)...) // the edges that keep the needs while we exist
	for try := 1; ; try++ {
		cctx, cancel := s.opCtx(ctx)
		resp, err := s.cli.Txn(cctx).If(cmps...).Then(ops...).Commit()
		cancel()
		if err == nil && resp.Succeeded {
			l.gone = true
			return nil
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("publish: %w", err))
		}
		// Ambiguous, or refused after an ambiguous try (which may have
		// applied late): only our Txn writes an avail record with our
		// attempt, so read it back on a context of our own.
		rctx, rcancel := s.opCtx(context.WithoutCancel(ctx))
		got, rerr := s.cli.Get(rctx, s.keys.AvailKey(id))
		rcancel()
		if rerr == nil && len(got.Kvs) == 1 {
			if p, derr := decode[PackageRecord](got.Kvs[0].Value); derr == nil && p.Attempt == pkg.Attempt {
				l.gone = true
				return nil
			}
		}
		switch {
		case err == nil:
			if gone := s.needGone(ctx, pkg.Needs); gone != nil {
				return gone // a need was invalidated while we built
			}
			return ErrFenced // refused, and not by our own earlier try
		case rerr != nil:
			errs = append(errs, rerr)
		}
		// Not applied (as far as we can tell): a call cut by a member that
		// froze or went away is tried again, still fenced, on another.
		if !cutShort(ctx, err) || try >= 4 {
			return errors.Join(errs...)
		}
		s.opt.logger.Debug("publish got no answer; trying again", "id", id, "err", err)
		if !sleepCtx(ctx, time.Duration(try)*100*time.Millisecond) {
			return errors.Join(append(errs, ctx.Err())...)
		}
	}
}

// cutShort reports a call of a step after the claim that got no answer
// and may be sent again: the member went away (transient), or the call's
// own deadline passed (a frozen leader) while the attempt's ctx is fine.
func cutShort(ctx context.Context, err error) bool {
	return ctx.Err() == nil && (transient(err) || errors.Is(err, context.DeadlineExceeded))
}

// failLater ends the attempt's "building" record in the background when
// fail could not: tell (the failed record, or its deletion) is applied
// only while the record is still the one our claim wrote, so it never
// touches a later attempt's; it gives up when that is no longer so or the
// store closes. Our lock key goes with the deferred release (or our lease).
func (a *attempt) failLater(tell clientv3.Op) {
	s, id, rev := a.s, a.id, a.buildRev
	s.spawn(func() {
		b := backoff.WithContext(backoff.NewExponentialBackOff(backoff.WithMaxElapsedTime(0), backoff.WithMaxInterval(5*time.Second)), s.ctx)
		backoff.Retry(func() error { //nolint:errcheck // ends only by success, a later attempt, or close
			ctx, cancel := s.opCtx(s.ctx)
			defer cancel()
			_, err := s.cli.Txn(ctx).
				If(clientv3.Compare(clientv3.ModRevision(s.keys.BuildKey(id)), "=", rev)). // still our claim
				Then(tell).
				Commit()
			return err
		}, b)
	})
}

// fail ends an attempt that did not publish: the record turns to "failed"
// (so the waiters of this attempt fail too), the lock is released in the
// same Txn, and the partial tree goes to the trash with the logs kept. The
// next attempt then finds no output directory and starts without the lock
// delay. If we no longer own the lock, the tree belongs to whoever does
// and is left alone.
func (a *attempt) fail(ctx context.Context, cause error) error {
	s, id, l := a.s, a.id, a.l
	s.opt.logger.Warn("build failed", "id", id, "err", cause)
	rec := a.rec
	rec.State = BuildFailed
	rec.Error = cause.Error()
	// Tell the waiters this attempt failed, unless it was merely abandoned
	// (every caller cancelled): then they should simply try themselves.
	tell := clientv3.OpPut(s.keys.BuildKey(id), mustJSON(rec), clientv3.WithLease(a.ls.ID))
	if errors.Is(cause, context.Canceled) || errors.Is(cause, context.DeadlineExceeded) || errors.Is(cause, ErrAbandon) {
		tell = clientv3.OpDelete(s.keys.BuildKey(id))
	}
	ambiguous := false
	for try := 1; ; try++ {
		cctx, cancel := s.opCtx(context.WithoutCancel(ctx))
		resp, err := s.cli.Txn(cctx).
			If(l.isOwner()). // the tree is ours to clear only while we hold the lock
			Then(tell, l.releaseOp()).
			Commit()
		cancel()
		switch {
		case err == nil && resp.Succeeded:
			l.gone = true
			if terr := s.moveToTrash(s.outputDir(id)); terr != nil {
				cause = errors.Join(cause, terr)
			}
		case err == nil && ambiguous:
			// An earlier try may have applied and released the lock: the
			// tree may be another attempt's by now. Leave it (the next
			// attempt moves leftovers aside after the lock delay).
			l.gone = true
		case err == nil:
			cause = errors.Join(cause, fmt.Errorf("%w; the tree was left to the new owner", ErrFenced))
		case cutShort(context.WithoutCancel(ctx), err) && try < 4:
			// Cut by a member that froze or went away: try again, still
			// fenced, on another.
			ambiguous = true
			time.Sleep(time.Duration(try) * 100 * time.Millisecond)
			continue
		default:
			// No answer at all: our record must not stay "building" on
			// our live lease (every host would wait for it until this
			// process ends). Keep at it in the background.
			s.opt.logger.Warn("recording the failure in etcd failed; retrying in the background", "id", id, "err", err)
			a.failLater(tell)
		}
		break
	}
	s.recordFailure(ctx, id, rec, cause) // P/failed/<id>, outliving our lease
	s.emit(Event{Kind: EventFailed, ID: id, Host: s.opt.host, PID: s.pid, Since: rec.Started, LogDir: rec.LogDir, Err: cause})
	return &BuildError{ID: id, Host: s.opt.host, PID: s.pid, LogDir: rec.LogDir, Err: cause}
}
