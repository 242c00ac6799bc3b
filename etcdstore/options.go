package etcdstore

import (
	"fmt"
	"log/slog"
	"os"
	"strings"
	"time"

	"github.com/granary-build/granary/internal/paths"
)

// Option configures a Store.
type Option func(*options)

type options struct {
	prefix    string
	ttl       time.Duration
	logger    *slog.Logger
	events    func(Event)
	cache     Cache
	lockDelay time.Duration
	opTimeout time.Duration
	host      string
	purpose   string
	initRoot  bool

	visibleTimeout time.Duration

	failureRetention time.Duration
	keptLogs         int
	yieldWait        time.Duration
}

// Defaults.
const (
	DefaultPrefix    = paths.DefaultPrefix
	DefaultTTL       = 15 * time.Second
	DefaultLockDelay = 5 * time.Second
	DefaultOpTimeout = 5 * time.Second
	// MinTTL is the shortest session TTL: the lease guard needs room for
	// two keep-alive rounds (every TTL/3, polled every 0.5 s) before it
	// gives up on the lease.
	MinTTL = 3 * time.Second
	// DefaultYieldWait bounds how long a removal that finds only cached
	// references waits for their owners to release them.
	DefaultYieldWait = 2 * time.Second
)

func defaultOptions() options {
	host, _ := os.Hostname()
	if host == "" {
		host = "unknown"
	}
	return options{
		prefix:    DefaultPrefix,
		ttl:       DefaultTTL,
		logger:    slog.New(slog.DiscardHandler),
		lockDelay: DefaultLockDelay,
		opTimeout: DefaultOpTimeout,
		host:      host,

		visibleTimeout:   DefaultVisibleTimeout,
		failureRetention: DefaultFailureRetention,
		keptLogs:         DefaultKeptLogs,
		yieldWait:        DefaultYieldWait,
	}
}

func (o *options) validate() error {
	switch {
	case o.prefix == "" || !strings.HasPrefix(o.prefix, "/") || !strings.HasSuffix(o.prefix, "/"):
		return fmt.Errorf("prefix %q must start and end with '/'", o.prefix)
	case o.ttl < MinTTL:
		return fmt.Errorf("TTL %v is shorter than the minimum %v", o.ttl, MinTTL)
	case o.ttl%time.Second != 0:
		return fmt.Errorf("TTL %v is not a whole number of seconds (etcd leases count seconds)", o.ttl)
	case o.lockDelay < 0:
		return fmt.Errorf("lock delay %v is negative", o.lockDelay)
	case o.opTimeout <= 0:
		return fmt.Errorf("operation timeout %v must be positive", o.opTimeout)
	case o.visibleTimeout < 0:
		return fmt.Errorf("visibility timeout %v is negative", o.visibleTimeout)
	case o.yieldWait < 0:
		return fmt.Errorf("yield wait %v is negative", o.yieldWait)
	case o.host == "":
		return fmt.Errorf("host name is empty")
	case o.failureRetention < time.Second:
		return fmt.Errorf("failure retention %v is shorter than a second", o.failureRetention)
	case o.keptLogs < 1:
		return fmt.Errorf("kept logs %d: keep at least 1", o.keptLogs)
	}
	return nil
}

// WithPrefix sets the etcd key prefix, default "/granary/". It must start
// and end with '/'. Stores that share a root must share a prefix.
func WithPrefix(prefix string) Option { return func(o *options) { o.prefix = prefix } }

// WithTTL sets the session lease TTL, default 15s, at least MinTTL, in
// whole seconds. A crashed holder's references and locks outlive it by up to
// this long; a process that stalls for about 2/3 of it loses its lease.
func WithTTL(ttl time.Duration) Option { return func(o *options) { o.ttl = ttl } }

// WithLogger sets the logger for what the store does on its own (lease
// loss, retries, background clean-up). The default discards.
func WithLogger(l *slog.Logger) Option { return func(o *options) { o.logger = l } }

// WithEvents registers a hook that receives progress events (waiting on a
// builder, building, published, failed, lease lost, …). It is called
// synchronously from the goroutine that made the progress and must not
// block.
func WithEvents(fn func(Event)) Option { return func(o *options) { o.events = fn } }

// WithCache sets a remote cache that Build checks under the build lock before
// running the builder, and fills after publishing.
func WithCache(c Cache) Option { return func(o *options) { o.cache = c } }

// WithLockDelay sets how long a builder that takes over from a dead attempt
// waits before it moves the dead attempt's tree aside (default 5s), so a
// frozen builder that wakes up has time to notice its lost lease and stop.
func WithLockDelay(d time.Duration) Option { return func(o *options) { o.lockDelay = d } }

// WithOpTimeout sets the deadline of each etcd call (default 5s). Waiting
// for another host's build is not one call: it is bounded by the caller's
// context and the builder's lease.
func WithOpTimeout(d time.Duration) Option { return func(o *options) { o.opTimeout = d } }

// WithYieldWait sets how long TryRemove waits for the owners of cached
// references (IncRefCachedContext) to release them when they are all it
// finds (default DefaultYieldWait); 0 makes it report such a package in
// use at once.
func WithYieldWait(d time.Duration) Option { return func(o *options) { o.yieldWait = d } }

// WithHost sets the host name recorded in build records and references
// (default os.Hostname()).
func WithHost(name string) Option { return func(o *options) { o.host = name } }

// WithPurpose sets a free-form purpose recorded with each reference this
// store takes, shown by Inspect (for example the command a job runs).
func WithPurpose(p string) Option { return func(o *options) { o.purpose = p } }

// WithFailureRetention sets how long the record of a failed attempt
// (LastFailure) outlives the attempt, default DefaultFailureRetention (a
// day), at least a second. etcd drops the record when it is over.
func WithFailureRetention(d time.Duration) Option {
	return func(o *options) { o.failureRetention = d }
}

// WithKeptLogs sets how many log files a package's logging directory keeps
// across attempts (the newest; default DefaultKeptLogs): each attempt
// writes its own file, so the logs of failed attempts survive the next one.
func WithKeptLogs(n int) Option { return func(o *options) { o.keptLogs = n } }
