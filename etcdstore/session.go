package etcdstore

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/cenkalti/backoff/v4"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// Session is a participant's etcd lease that keeps itself alive, distrusts
// itself before the server could expire it, and comes back, in the spirit
// of etcd's concurrency.Session:
//
//   - Each granted lease is a *Lease whose Done channel closes, with a cause
//     wrapping ErrLeaseLost, the moment the lease is in doubt: when no
//     keep-alive acknowledgement has arrived for 2/3 of the TTL (two renewal
//     rounds), or the keep-alive stream ends. Work that must not outlive
//     the lease (builders, lock waits) is tied to it.
//   - The Session then grants a new lease in the background, with backoff,
//     and runs every function registered with OnRenew on it before anyone
//     else can use it: that is how the keys that ride on the lease
//     (references, a node's registration) come back.
//   - Close revokes every lease the Session made, so its keys go at once
//     instead of after the TTL.
//
// A Session is safe for concurrent use. Store uses one for its references,
// locks and build records; the node uses one for its registration.
type Session struct {
	cli *clientv3.Client
	cfg SessionConfig

	ctx    context.Context // ends at Close
	cancel context.CancelFunc
	wg     sync.WaitGroup // the guard of each lease, re-establishment

	// mu is a leaf lock: nothing else is locked, and nothing that blocks or
	// calls out is done, while it is held.
	mu      sync.Mutex
	closed  bool
	cur     *Lease             // nil while a new lease is being made
	ready   chan struct{}      // closed when cur is set or the session closes
	lastErr error              // why the last attempt at a new lease failed
	retired []clientv3.LeaseID // leases given up on but not yet revoked
	renew   []func(context.Context, *Lease)
}

// SessionConfig configures a Session. TTL and OpTimeout are required.
type SessionConfig struct {
	TTL       time.Duration // lease TTL, a whole number of seconds, at least MinTTL
	OpTimeout time.Duration // deadline of each etcd call
	Logger    *slog.Logger  // nil discards
	// OnLost, if set, is called (from the guard's goroutine) after a lease
	// was found in doubt or gone, with the cause.
	OnLost func(cause error)
	// OnRestored, if set, is called after a new lease replaced a lost one
	// and the OnRenew functions ran on it.
	OnRestored func()
}

func (c *SessionConfig) validate() error {
	switch {
	case c.TTL < MinTTL:
		return fmt.Errorf("TTL %v is shorter than the minimum %v", c.TTL, MinTTL)
	case c.TTL%time.Second != 0:
		return fmt.Errorf("TTL %v is not a whole number of seconds (etcd leases count seconds)", c.TTL)
	case c.OpTimeout <= 0:
		return fmt.Errorf("operation timeout %v must be positive", c.OpTimeout)
	}
	return nil
}

// Lease is one granted lease of a Session.
type Lease struct {
	ID  clientv3.LeaseID
	hex string
	// ctx is cancelled, with the reason as its cause, the moment the lease
	// is in doubt, lost or revoked.
	ctx      context.Context
	cancel   context.CancelCauseFunc
	kaCancel context.CancelFunc
}

// Done is closed when the lease can no longer be trusted.
func (l *Lease) Done() <-chan struct{} { return l.ctx.Done() }

// Err is nil while the lease can be trusted, and then why it cannot (an
// error wrapping ErrLeaseLost or ErrClosed).
func (l *Lease) Err() error {
	if l.ctx.Err() == nil {
		return nil
	}
	return context.Cause(l.ctx)
}

// Hex is the lease ID in the hexadecimal form that etcd's lock keys use.
func (l *Lease) Hex() string { return l.hex }

func (l *Lease) end(cause error) {
	l.cancel(cause)
	l.kaCancel()
}

// NewSession grants the first lease and starts keeping it alive. The caller
// must Close the Session before closing cli.
func NewSession(ctx context.Context, cli *clientv3.Client, cfg SessionConfig) (*Session, error) {
	if err := cfg.validate(); err != nil {
		return nil, fmt.Errorf("session: %w", err)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	s := &Session{cli: cli, cfg: cfg, ready: make(chan struct{})}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	l, err := s.grant(ctx)
	if err != nil {
		s.cancel()
		return nil, fmt.Errorf("create lease: %w", err)
	}
	s.install(l)
	return s, nil
}

// OnRenew registers fn to run on every new lease that replaces a lost one,
// before the lease is handed to anyone: fn puts back the keys that rode on
// the old lease. fn must not call Current (it would wait for itself).
func (s *Session) OnRenew(fn func(ctx context.Context, l *Lease)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.renew = append(s.renew, fn)
}

// ID returns the current lease's ID, or 0 while a new one is being made.
func (s *Session) ID() clientv3.LeaseID {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cur == nil {
		return 0
	}
	return s.cur.ID
}

// trusted reports whether id is the current lease and the guard trusts
// it (a keep-alive acknowledgement came within 2/3 of the TTL). No I/O.
func (s *Session) trusted(id clientv3.LeaseID) bool {
	s.mu.Lock()
	l := s.cur
	s.mu.Unlock()
	return l != nil && l.ID == id && l.Err() == nil
}

// Current returns the lease to use now. While a new lease is being made it
// waits, for at most the operation timeout, so that no call hangs while
// etcd is away; the error then wraps ErrLeaseLost. After Close it returns
// ErrClosed.
func (s *Session) Current(ctx context.Context) (*Lease, error) {
	var deadline <-chan time.Time
	for {
		s.mu.Lock()
		closed, l, ready, lastErr := s.closed, s.cur, s.ready, s.lastErr
		s.mu.Unlock()
		if closed {
			return nil, ErrClosed
		}
		if l != nil && l.Err() == nil {
			return l, nil
		}
		if deadline == nil {
			t := time.NewTimer(s.cfg.OpTimeout)
			defer t.Stop()
			deadline = t.C
		}
		var retry <-chan time.Time
		if l != nil {
			// The lease ended but its guard has not retired it yet (a
			// moment's race): look again shortly.
			ready, retry = nil, time.After(10*time.Millisecond)
		}
		select {
		case <-ready:
		case <-retry:
		case <-ctx.Done():
			return nil, fmt.Errorf("%w: waiting for a new lease: %w", ErrLeaseLost, ctx.Err())
		case <-deadline:
			if lastErr == nil {
				lastErr = errors.New("still trying")
			}
			return nil, fmt.Errorf("%w: no new lease within %v (last attempt: %v)", ErrLeaseLost, s.cfg.OpTimeout, lastErr)
		}
	}
}

// Close ends the current lease (its Done closes with ErrClosed), stops
// renewal, and revokes every lease the session made. It returns an error if
// a revocation did not reach etcd; such a lease expires after the TTL.
func (s *Session) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	cur := s.cur
	s.cur = nil
	select {
	case <-s.ready:
	default:
		close(s.ready)
	}
	s.mu.Unlock()

	if cur != nil {
		cur.end(ErrClosed)
	}
	s.cancel()
	s.wg.Wait()
	s.mu.Lock()
	leases := s.retired
	s.mu.Unlock()
	if cur != nil {
		leases = append(leases, cur.ID)
	}
	var errs []error
	for _, id := range leases {
		errs = append(errs, s.revoke(id))
	}
	return errors.Join(errs...)
}

func (s *Session) opCtx(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(clientv3.WithRequireLeader(ctx), s.cfg.OpTimeout)
}

func (s *Session) revoke(id clientv3.LeaseID) error {
	ctx, cancel := s.opCtx(context.Background())
	defer cancel()
	// A lease etcd no longer knows (expired, or revoked by someone else)
	// is as gone as Close wants it.
	if _, err := s.cli.Revoke(ctx, id); err != nil && !errors.Is(err, rpctypes.ErrLeaseNotFound) {
		return fmt.Errorf("revoke lease %x (it expires within %v): %w", int64(id), s.cfg.TTL, err)
	}
	return nil
}

// grant makes a lease and starts its keep-alive and the guard that watches
// the acknowledgements.
func (s *Session) grant(ctx context.Context) (*Lease, error) {
	cctx, cancel := s.opCtx(ctx)
	resp, err := s.cli.Grant(cctx, int64(s.cfg.TTL/time.Second))
	cancel()
	if err != nil {
		return nil, err
	}
	granted := time.Now()
	kactx, kaCancel := context.WithCancel(s.ctx)
	ka, err := s.cli.KeepAlive(kactx, resp.ID)
	if err != nil {
		kaCancel()
		return nil, err
	}
	lctx, lcancel := context.WithCancelCause(s.ctx)
	l := &Lease{ID: resp.ID, hex: fmt.Sprintf("%x", int64(resp.ID)), ctx: lctx, cancel: lcancel, kaCancel: kaCancel}
	s.wg.Add(1)
	go s.guard(l, ka, granted)
	return l, nil
}

// install makes l the current lease. It reports false, and revokes l, if
// the session closed meanwhile.
func (s *Session) install(l *Lease) bool {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		l.end(ErrClosed)
		s.revoke(l.ID) //nolint:errcheck // best effort: the lease expires anyway
		return false
	}
	s.cur = l
	s.lastErr = nil
	close(s.ready)
	s.mu.Unlock()
	return true
}

// doubtAfter is how long the guard waits for a keep-alive acknowledgement
// before it distrusts the lease: two renewal rounds (each TTL/3) have then
// gone unanswered, and the server, which counts the TTL from a renewal that
// came before our last acknowledgement, cannot have expired the lease for at
// least another TTL/3.
func (s *Session) doubtAfter() time.Duration { return s.cfg.TTL * 2 / 3 }

// guard watches the keep-alive acknowledgements of l and declares the
// lease lost when they stop, before the server can expire it.
func (s *Session) guard(l *Lease, ka <-chan *clientv3.LeaseKeepAliveResponse, granted time.Time) {
	defer s.wg.Done()
	wait := s.doubtAfter()
	t := time.NewTimer(time.Until(granted.Add(wait)))
	defer t.Stop()
	for {
		select {
		case _, ok := <-ka:
			if !ok {
				s.lost(l, errors.New("keep-alive stream ended (lease expired or revoked)"))
				return
			}
			t.Reset(wait)
		case <-t.C:
			s.lost(l, fmt.Errorf("no keep-alive acknowledgement for %v of a %v TTL", wait, s.cfg.TTL))
			return
		case <-l.ctx.Done():
			return
		}
	}
}

// unknown is for an etcd call on l that failed with ErrLeaseNotFound: etcd
// no longer knows the lease (revoked, or expired), so it is given up now
// rather than at the next keep-alive, which could be TTL/3 away (callers
// that start over would otherwise spin on a lease that is gone). It
// returns err wrapped in ErrLeaseLost.
func (s *Session) unknown(l *Lease, err error) error {
	s.lost(l, fmt.Errorf("etcd no longer knows the lease: %v", err))
	return fmt.Errorf("%w: %v", ErrLeaseLost, err)
}

// lost retires l and makes a new lease in the background.
func (s *Session) lost(l *Lease, why error) {
	s.mu.Lock()
	if s.closed || s.cur != l {
		s.mu.Unlock()
		return
	}
	s.cur = nil
	s.ready = make(chan struct{})
	s.retired = append(s.retired, l.ID)
	s.mu.Unlock()

	cause := fmt.Errorf("%w: %v", ErrLeaseLost, why)
	l.end(cause)
	s.cfg.Logger.Warn("etcd lease lost; making a new lease", "lease", l.hex, "why", why)
	if s.cfg.OnLost != nil {
		s.cfg.OnLost(cause)
	}
	s.wg.Add(1)
	go s.reestablish(l)
}

func (s *Session) reestablish(old *Lease) {
	defer s.wg.Done()
	b := backoff.WithContext(backoff.NewExponentialBackOff(
		backoff.WithInitialInterval(100*time.Millisecond),
		backoff.WithMaxInterval(5*time.Second),
		backoff.WithMaxElapsedTime(0),
	), s.ctx)
	var l *Lease
	err := backoff.RetryNotify(func() error {
		var err error
		l, err = s.grant(s.ctx)
		return err
	}, b, func(err error, next time.Duration) {
		s.mu.Lock()
		s.lastErr = err
		s.mu.Unlock()
		s.cfg.Logger.Warn("cannot make a new etcd lease yet", "err", err, "retry_in", next)
	})
	if err != nil {
		return // closing
	}
	s.mu.Lock()
	renew := slices.Clone(s.renew)
	s.mu.Unlock()
	for _, fn := range renew {
		fn(s.ctx, l)
	}
	if !s.install(l) {
		return
	}
	s.cfg.Logger.Info("new etcd lease in place", "lease", l.hex)
	if s.cfg.OnRestored != nil {
		s.cfg.OnRestored()
	}
	// The old lease may still be alive (we only doubted it): revoke it so
	// the keys that rode on it and were put back on the new one do not
	// linger.
	if err := s.revoke(old.ID); err != nil {
		s.cfg.Logger.Debug("old lease not revoked; it will expire", "err", err)
		return
	}
	s.mu.Lock()
	s.retired = slices.DeleteFunc(s.retired, func(id clientv3.LeaseID) bool { return id == old.ID })
	s.mu.Unlock()
}
