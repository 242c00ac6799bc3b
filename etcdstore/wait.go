package etcdstore

import (
	"context"
	"errors"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// waiter is one attempt's wait for a package: it watches the package's
// keys and queues for its lock at the same time, and ends with whichever
// comes first.
type waiter struct {
	s         *Store
	ls        *Lease
	id        string
	st        state // the read the wait starts from
	published func(Outcome, error)
	start     time.Time

	cancel  context.CancelFunc // ends the watches and the lock attempt
	availCh clientv3.WatchChan
	buildCh clientv3.WatchChan
}

// waitOrLock returns the held lock; or a nil lock and the Waited outcome
// when another host published first (having called published before it
// gave up its place in the lock queue); or a *BuildError when the attempt
// we waited on failed; or a *retryError when the wait must start over.
func (w *waiter) waitOrLock(ctx context.Context) (*lock, Outcome, error) {
	s := w.s
	w.start = time.Now()
	if s.testHookWait != nil {
		s.testHookWait(w.id)
	}
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	w.cancel = cancel
	if out, done, err := w.watch(ctx, wctx); done || err != nil {
		return nil, out, err
	}

	l := s.newLock(w.ls, s.keys.LockPrefix(w.id))
	lockErr := make(chan error, 1)
	go func() { lockErr <- l.lock(wctx) }()
	held, lockDone, out, err := w.loop(ctx, lockErr)
	if held {
		return l, Outcome{}, nil
	}
	// Stop the lock attempt and make sure we do not keep the lock. If
	// loop took the lock attempt's (failed) result, there is nothing more
	// to receive: waiting for it hung every caller of the ID on this host
	// (the farm soak, during etcd freezes).
	cancel()
	if !lockDone && <-lockErr == nil {
		l.release()
	}
	return nil, out, err
}

// watch starts the package's watches (watchPkg). What changed between st
// and their start is read again here; done reports that the wait is over
// already.
func (w *waiter) watch(ctx, wctx context.Context) (out Outcome, done bool, err error) {
	s := w.s
	pw, err := s.watchPkg(ctx, wctx, w.id)
	if err != nil {
		return Outcome{}, true, w.watchEnded(ctx, err)
	}
	w.availCh, w.buildCh = pw.avail, pw.build
	if pw.from <= w.st.rev {
		return Outcome{}, false, nil
	}
	now, err := s.readState(ctx, w.id)
	if err != nil {
		return Outcome{}, true, err
	}
	if now.avail != nil {
		out := w.outcome(now.avail)
		w.published(out, nil)
		return out, true, nil
	}
	if b := now.build; b != nil && b.State == BuildFailed && now.buildModRev > w.st.rev {
		return Outcome{}, true, failedAttempt(w.id, b) // the attempt we found running failed meanwhile
	}
	w.st.build = now.build
	return Outcome{}, false, nil
}

// loop waits for the lock, a publish, or the failure of the attempt we
// wait on. held reports that the lock is ours; lockDone that loop took
// the lock attempt's result (then it must not be awaited again).
func (w *waiter) loop(ctx context.Context, lockErr <-chan error) (held, lockDone bool, out Outcome, err error) {
	s := w.s
	if b := w.st.build; b != nil && b.State == BuildRunning {
		w.emitWaiting(b)
	}
	for {
		select {
		case err := <-lockErr:
			return err == nil, true, Outcome{}, err
		case wr, ok := <-w.availCh:
			if !ok || wr.Err() != nil {
				return false, false, Outcome{}, w.watchEnded(ctx, wr.Err())
			}
			for _, ev := range wr.Events {
				if ev.Type != clientv3.EventTypePut {
					continue
				}
				// Release our callers now: the lock key's deletion is one
				// more round trip they need not wait for (the local lock
				// stays held until it is done).
				rec, _ := decode[PackageRecord](ev.Kv.Value)
				out := w.outcome(rec)
				w.published(out, nil)
				if s.testHookCleanup != nil {
					s.testHookCleanup(w.id)
				}
				return false, false, out, nil
			}
		case wr, ok := <-w.buildCh:
			if !ok || wr.Err() != nil {
				return false, false, Outcome{}, w.watchEnded(ctx, wr.Err())
			}
			if err := w.buildEvents(wr.Events); err != nil {
				return false, false, Outcome{}, err
			}
		case <-ctx.Done():
			return false, false, Outcome{}, ctx.Err()
		}
	}
}

// buildEvents follows the attempt we wait on: its failure ends our wait;
// a new attempt is announced; a deletion (its builder's lease ended) means
// the lock comes our way.
func (w *waiter) buildEvents(evs []*clientv3.Event) error {
	for _, ev := range evs {
		if ev.Type != clientv3.EventTypePut {
			continue
		}
		b, err := decode[BuildRecord](ev.Kv.Value)
		if err != nil {
			continue
		}
		switch b.State {
		case BuildFailed:
			return failedAttempt(w.id, b)
		case BuildRunning:
			w.emitWaiting(b)
		}
	}
	return nil
}

// sawRunning reports whether the wait began with another attempt running.
func (w *waiter) sawRunning() bool {
	return w.st.build != nil && w.st.build.State == BuildRunning
}

func (w *waiter) emitWaiting(b *BuildRecord) {
	w.s.emit(Event{Kind: EventWaiting, ID: w.id, Host: b.Host, PID: b.PID, Since: b.Started, LogDir: b.LogDir})
}

func (w *waiter) outcome(rec *PackageRecord) Outcome {
	return Outcome{How: Waited, Package: rec, LogDir: w.s.logDir(w.id), Waited: time.Since(w.start)}
}

// watchEnded turns the end of a watch into a *retryError (so the attempt
// starts over from a fresh read: compaction, lost leader, lease gone) or
// ctx's error.
func (w *waiter) watchEnded(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if err == nil {
		err = errWatchClosed
	}
	w.s.opt.logger.Debug("watch ended; reading state again", "err", err)
	// Avoid spinning while etcd has no leader.
	select {
	case <-time.After(100 * time.Millisecond):
	case <-ctx.Done():
		return ctx.Err()
	case <-w.ls.Done():
	}
	return &retryError{why: err}
}

func failedAttempt(id string, b *BuildRecord) *BuildError {
	return &BuildError{ID: id, Host: b.Host, PID: b.PID, LogDir: b.LogDir, Err: errors.New(b.Error)}
}

// awaitAttempt waits for the end of the attempt that IncRef found in
// progress: this store's own flight, or seen, another host's. ended
// reports that the attempt published, failed or died; it is false when
// the wait broke off (a watch ended) and the caller should look again.
func (s *Store) awaitAttempt(ctx context.Context, id string, seen *attemptSeen) (ended bool, err error) {
	if f := s.flying(id); f != nil {
		select {
		case <-f.done:
			return true, nil
		case <-ctx.Done():
			return false, ctx.Err()
		case <-s.ctx.Done():
			return false, ErrClosed
		}
	}
	if seen == nil {
		return true, nil
	}
	s.emit(Event{Kind: EventWaiting, ID: id, Host: seen.rec.Host, PID: seen.rec.PID, Since: seen.rec.Started, LogDir: seen.rec.LogDir})
	// From just after the read that saw the attempt, so nothing is missed.
	// Any change ends it: a publish, the record's deletion (the attempt
	// died) or its turn to failed; a new attempt's record comes only after
	// the old one's deletion.
	return s.watchBuildEnd(ctx, id, seen.rev)
}

// wctxErr says why a wait under wctx (ctx's, ended also by Close) broke
// off: ctx's error, ErrClosed, or nil for a watch that ended by itself.
func wctxErr(ctx, wctx context.Context) error {
	switch {
	case ctx.Err() != nil:
		return ctx.Err()
	case wctx.Err() != nil:
		return ErrClosed
	}
	return nil
}
