package etcdstore

import (
	"cmp"
	"context"
	"errors"
	"fmt"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/granary-build/granary/core"
)

// WaitBuildEnd blocks while package id is being built and returns its
// state once it is not: StateAvailable when it was published,
// StateFailed when the attempt failed (its record turned to failed, or its
// builder's record vanished and a failure record names it), StateAbsent
// when the attempt ended without either (its builder died or gave up). It
// returns at once when no attempt is running. It waits with watches from
// the revision of its first read, so no change is missed between the two.
func (s *Store) WaitBuildEnd(ctx context.Context, id string) (State, error) {
	if err := core.ValidateID(id); err != nil {
		return "", fmt.Errorf("wait for build: %w", err)
	}
	for {
		st, err := s.readState(ctx, id)
		if err != nil {
			return "", fmt.Errorf("wait for build of %q: %w", id, err)
		}
		if state, done := s.settled(ctx, id, st); done {
			return state, nil
		}
		ended, err := s.watchBuildEnd(ctx, id, st.rev)
		if err != nil {
			return "", fmt.Errorf("wait for build of %q: %w", id, err)
		}
		if !ended {
			continue // the watch was cut (compaction, no leader): read again
		}
	}
}

// settled says what a state read means for WaitBuildEnd.
func (s *Store) settled(ctx context.Context, id string, st state) (State, bool) {
	switch {
	case st.avail != nil:
		return StateAvailable, true
	case st.build != nil && st.build.State == BuildFailed:
		return StateFailed, true
	case st.build != nil:
		return "", false
	}
	if fr, _, err := s.lastFailure(ctx, id); err == nil && fr != nil {
		return StateFailed, true
	}
	return StateAbsent, true
}

// pkgWatch is the watches on one package's avail and build keys that every
// wait for an attempt's end runs on (watchBuildEnd; the build's waiter).
type pkgWatch struct {
	avail, build clientv3.WatchChan
	// from: every change after this revision reaches the watches.
	from int64
}

// watchPkg starts the watches on id's avail and build keys under wctx and
// returns once etcd has registered both. They start at the current
// revision, not at the revision of the caller's read: etcd delivers
// events to a watch that starts in the past only once its sync loop has
// caught it up, every 100 ms, and on a busy store (every write moves the
// revision) a publish in that window reached waiters that much later.
// What changed between the caller's read and from is the caller's to read
// again. It fails with ctx's error, or the watch's if it ended.
func (s *Store) watchPkg(ctx, wctx context.Context, id string) (pkgWatch, error) {
	var w pkgWatch
	var err error
	var from int64
	if w.avail, w.from, err = s.watchNow(ctx, wctx, s.keys.AvailKey(id)); err != nil {
		return w, err
	}
	if w.build, from, err = s.watchNow(ctx, wctx, s.keys.BuildKey(id)); err != nil {
		return w, err
	}
	w.from = max(w.from, from)
	return w, nil
}

// watchNow starts a watch on key (with opts) under wctx at the current
// revision and returns it once etcd has registered it, with the revision
// from which every change reaches it (see watchPkg for why not from an
// older one). It fails with ctx's error, or the watch's if it ended.
func (s *Store) watchNow(ctx, wctx context.Context, key string, opts ...clientv3.OpOption) (clientv3.WatchChan, int64, error) {
	ch := s.cli.Watch(wctx, key, append(opts, clientv3.WithCreatedNotify())...)
	select {
	case wr, ok := <-ch:
		if !ok || wr.Err() != nil || !wr.Created {
			return ch, 0, cmp.Or(wr.Err(), errWatchClosed)
		}
		// etcd reads the revision after registering the watch.
		return ch, wr.Header.Revision, nil
	case <-ctx.Done():
		return ch, 0, ctx.Err()
	}
}

// errWatchClosed is a watch that ended without saying why.
var errWatchClosed = errors.New("watch closed")

// watchBuildEnd waits until the attempt a read at revision rev saw
// running ends: until id's avail or build key changes after rev (the one
// wait for an attempt to end: WaitBuildEnd's and IncRef's). It reports
// false when the wait broke off without seeing a change, with ctx's
// error, ErrClosed if the store closed, or nil (the caller reads again).
func (s *Store) watchBuildEnd(ctx context.Context, id string, rev int64) (bool, error) {
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	defer context.AfterFunc(s.ctx, cancel)() // Close ends the wait
	w, err := s.watchPkg(ctx, wctx, id)
	if err != nil {
		return false, s.watchBroke(ctx, wctx, id, err)
	}
	if w.from > rev {
		// Changes between rev and the watches' start are not in them.
		if ended, err := s.changedSince(ctx, id, rev); err != nil || ended {
			return ended, s.watchBroke(ctx, wctx, id, err)
		}
	}
	for {
		var wr clientv3.WatchResponse
		var ok bool
		select {
		case wr, ok = <-w.avail:
		case wr, ok = <-w.build:
		case <-wctx.Done():
			return false, wctxErr(ctx, wctx)
		}
		if !ok || wr.Err() != nil {
			return false, s.watchBroke(ctx, wctx, id, wr.Err())
		}
		if len(wr.Events) > 0 {
			return true, nil
		}
	}
}

// changedSince reports whether id's avail or build key changed after rev,
// when a running attempt's record was there: the package is published, or
// the record is gone or was written again (failed).
func (s *Store) changedSince(ctx context.Context, id string, rev int64) (bool, error) {
	cctx, cancel := s.opCtx(ctx)
	defer cancel()
	resp, err := s.cli.Txn(cctx).Then(
		clientv3.OpGet(s.keys.AvailKey(id), clientv3.WithCountOnly()),
		clientv3.OpGet(s.keys.BuildKey(id), clientv3.WithKeysOnly())).Commit()
	if err != nil {
		return false, err
	}
	build := resp.Responses[1].GetResponseRange().Kvs
	return resp.Responses[0].GetResponseRange().Count > 0 || len(build) == 0 || build[0].ModRevision > rev, nil
}

// watchBroke says what a wait whose watch (or read) failed with err
// returns: ctx's error or ErrClosed if they ended it, else nil (the caller
// reads again), logged.
func (s *Store) watchBroke(ctx, wctx context.Context, id string, err error) error {
	if err := wctxErr(ctx, wctx); err != nil {
		return err
	}
	if err != nil && !errors.Is(err, context.Canceled) {
		s.opt.logger.Debug("watch ended; reading state again", "id", id, "err", err)
	}
	return nil
}
