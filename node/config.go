package node

import (
	"errors"
	"flag"
	"fmt"
	"math"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/granary-build/granary/agent"
	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/etcdstore/cache"
	"github.com/granary-build/granary/internal/paths"
)

// Config is everything a node, or a CLI command acting as one host, needs.
// Start from DefaultConfig, apply the environment with FromEnv and flags with
// RegisterFlags, then call Validate (New does).
type Config struct {
	// Root is the shared package root (NFS in production). Default
	// $XDG_DATA_HOME/granary, else ~/.local/share/granary.
	Root string
	// StateDir is host-local state: the embedded etcd's data and socket, the
	// local node's lock, info and log. Never on the shared root. Default
	// $XDG_STATE_HOME/granary, else ~/.local/state/granary.
	StateDir string

	// Endpoints are the etcd members. Empty means the embedded default: a
	// single-member etcd in StateDir, listening on a unix socket.
	Endpoints []string
	// Prefix is the etcd key prefix (etcdstore.DefaultPrefix).
	Prefix string
	// TTL is the lease TTL of stores and of the node registration.
	TTL time.Duration

	// CACert, Cert and Key enable TLS (etcdctl's --cacert, --cert, --key).
	CACert, Cert, Key string
	// User and Password authenticate to etcd. The password comes from
	// GRANARY_PASSWORD or PasswordFile, never from a flag alone.
	User, Password string
	// PasswordFile holds the password (trailing newline ignored). It is
	// read when a client is made (ClientConfig), so Password stays empty.
	PasswordFile string

	// Name names this host in records and in P/node/<name>/<lease>. Default
	// os.Hostname().
	Name string

	// Cache is the URL of a remote cache of published packages
	// (etcdstore/cache.Open: http://, https://, s3://bucket/prefix,
	// file:///path); empty: none.
	// Builds check it before running a builder and fill it after
	// publishing.
	Cache string
	// CacheToken is a bearer token for an HTTP cache, from
	// GRANARY_CACHE_TOKEN only (never a flag). Basic auth goes in the URL.
	CacheToken string
	// CacheCACert is a CA bundle to verify an HTTPS cache (default: the
	// system's).
	CacheCACert string
	// CacheSignKey is a secret key file ('granary cache keygen'): entries
	// this host uploads are signed with it.
	CacheSignKey string
	// CacheTrustedKeys lists the public keys (NAME:BASE64, separated by
	// spaces or commas) whose signatures this host accepts; when set, an
	// entry not signed by one of them is refused and built instead.
	CacheTrustedKeys string
	// CacheFetchBudget bounds each cache fetch under the build lock
	// (0: cache.DefaultFetchBudget).
	CacheFetchBudget time.Duration

	// ListenMetrics is the address of /metrics, /healthz and /readyz; empty
	// disables the HTTP server.
	ListenMetrics string

	// GCInterval is how often the node prunes; 0 disables the GC loop.
	GCInterval time.Duration
	// GC says what each sweep removes.
	GC etcdstore.PruneOptions

	// IdleTimeout makes an embedded node exit after this long without any
	// other lease (client) in its etcd; 0 (the default) means never. The CLI
	// starts its background node with DefaultIdleTimeout unless told
	// otherwise.
	IdleTimeout time.Duration

	// Events, if set, receives the node store's events (after the node's
	// metrics have seen them). It must not block.
	Events func(etcdstore.Event)

	// Linger is how long the node keeps its etcd reference to a package
	// after the last local holder (a Conn of the local API) let go, so that
	// a package used job after job costs etcd nothing. 0 releases at once.
	Linger time.Duration
	// YieldWait is how long a removal from this host that finds only
	// other nodes' lingering (cached) references waits for them to be
	// released at its request (etcdstore.WithYieldWait); 0 refuses at once.
	YieldWait time.Duration
	// SocketMode is the permission of the local API socket
	// <StateDir>/agent.sock (default 0600: the node's user only). A mode
	// that lets group or others in also makes StateDir searchable (o+x),
	// not readable.
	SocketMode os.FileMode
	// SocketGroup, if set, is the group (name or number) the socket is
	// given: with SocketMode 0660, the host's job users in that group may
	// connect.
	SocketGroup string
	// AdminGroup, if set, is the group (name or number) whose members may,
	// through the socket, remove (rm), pin, unpin and invalidate packages,
	// besides root and the node's own user, who always may. Other callers
	// that can reach the socket may take references, run and build only.
	AdminGroup string
	// FailureRetention is how long the record of a failed build attempt
	// is kept (0: etcdstore.DefaultFailureRetention, a day).
	FailureRetention time.Duration

	// OpTimeout bounds each etcd call; DialTimeout bounds the auth token
	// fetch and the first keep-alive.
	OpTimeout   time.Duration
	DialTimeout time.Duration
}

// Defaults.
const (
	DefaultGCInterval = 10 * time.Minute
	// DefaultLinger is how long a node keeps a package's etcd reference
	// after its last local holder.
	DefaultLinger = 10 * time.Minute
	// DefaultIdleTimeout is the idle period of a node the CLI starts.
	DefaultIdleTimeout = 15 * time.Minute
	// MaxSocketPath is the longest unix socket path accepted (the kernel
	// limit is 107 bytes; we keep a margin).
	MaxSocketPath = 100
)

// DefaultConfig returns the defaults: embedded etcd, XDG directories, the
// etcdstore defaults, GC every 10 minutes of what was unused for 30 days.
// It reads only the XDG and HOME environment variables.
func DefaultConfig() Config {
	host, _ := os.Hostname()
	if host == "" {
		host = "localhost"
	}
	return Config{
		Root:        paths.DefaultRoot(),
		StateDir:    paths.DefaultStateDir(),
		Prefix:      paths.DefaultPrefix,
		TTL:         etcdstore.DefaultTTL,
		Name:        host,
		GCInterval:  DefaultGCInterval,
		Linger:      DefaultLinger,
		YieldWait:   etcdstore.DefaultYieldWait,
		SocketMode:  0o600,
		GC:          etcdstore.PruneOptions{OlderThan: 30 * 24 * time.Hour, MaxRemovals: 100},
		OpTimeout:   etcdstore.DefaultOpTimeout,
		DialTimeout: 5 * time.Second,
	}
}

// Environment variables read by FromEnv.
const (
	EnvRoot         = paths.EnvRoot
	EnvStateDir     = paths.EnvStateDir
	EnvEndpoints    = "GRANARY_ENDPOINTS"
	EnvPrefix       = paths.EnvPrefix
	EnvTTL          = "GRANARY_TTL"
	EnvCACert       = "GRANARY_CACERT"
	EnvCert         = "GRANARY_CERT"
	EnvKey          = "GRANARY_KEY"
	EnvUser         = "GRANARY_USER"
	EnvPassword     = "GRANARY_PASSWORD"
	EnvPasswordFile = "GRANARY_PASSWORD_FILE"
	EnvHost         = "GRANARY_HOST"
	EnvIdleTimeout  = "GRANARY_IDLE_TIMEOUT"
	EnvCache        = "GRANARY_CACHE"
	EnvCacheToken   = "GRANARY_CACHE_TOKEN"
	EnvCacheCACert  = "GRANARY_CACHE_CACERT"
	EnvCacheSignKey = "GRANARY_CACHE_SIGN_KEY"
	EnvCacheTrusted = "GRANARY_CACHE_TRUSTED_KEYS"
	EnvCacheBudget  = "GRANARY_CACHE_FETCH_BUDGET"
	// EnvAdminGroup sets AdminGroup.
	EnvAdminGroup = "GRANARY_ADMIN_GROUP"
	// EnvFailureRetention sets FailureRetention.
	EnvFailureRetention = "GRANARY_FAILURE_RETENTION"
)

// FromEnv applies the GRANARY_* variables that getenv returns non-empty.
// A malformed value is an error.
func (c *Config) FromEnv(getenv func(string) string) error {
	set := func(dst *string, name string) {
		if v := getenv(name); v != "" {
			*dst = v
		}
	}
	c.places().FromEnv(getenv)
	set(&c.CACert, EnvCACert)
	set(&c.Cert, EnvCert)
	set(&c.Key, EnvKey)
	set(&c.User, EnvUser)
	set(&c.Password, EnvPassword)
	set(&c.PasswordFile, EnvPasswordFile)
	set(&c.Name, EnvHost)
	set(&c.Cache, EnvCache)
	set(&c.CacheToken, EnvCacheToken)
	set(&c.CacheCACert, EnvCacheCACert)
	set(&c.CacheSignKey, EnvCacheSignKey)
	set(&c.CacheTrustedKeys, EnvCacheTrusted)
	set(&c.AdminGroup, EnvAdminGroup)
	if v := getenv(EnvCacheBudget); v != "" {
		d, err := parseSeconds(v)
		if err != nil {
			return fmt.Errorf("%s=%q: %w", EnvCacheBudget, v, err)
		}
		c.CacheFetchBudget = d
	}
	if v := getenv(EnvEndpoints); v != "" {
		c.Endpoints = splitList(v)
	}
	if v := getenv(EnvIdleTimeout); v != "" {
		d, err := ParseNonNegative(v)
		if err != nil {
			return fmt.Errorf("%s=%q: %w", EnvIdleTimeout, v, err)
		}
		c.IdleTimeout = d
	}
	if v := getenv(EnvFailureRetention); v != "" {
		d, err := ParseNonNegative(v)
		if err != nil {
			return fmt.Errorf("%s=%q: %w", EnvFailureRetention, v, err)
		}
		c.FailureRetention = d
	}
	if v := getenv(EnvTTL); v != "" {
		d, err := parseSeconds(v)
		if err != nil {
			return fmt.Errorf("%s=%q: %w", EnvTTL, v, err)
		}
		c.TTL = d
	}
	return nil
}

// ParseNonNegative parses a duration (time.ParseDuration) and refuses a
// negative one: a sign typed by mistake must not turn "older than 5m" into
// "everything".
func ParseNonNegative(s string) (time.Duration, error) {
	d, err := time.ParseDuration(s)
	if err != nil {
		return 0, err
	}
	if d < 0 {
		return 0, ErrNegative
	}
	return d, nil
}

// NonNegative returns a flag.Value that sets *p from a duration and refuses
// a negative one (the flag package then reports the value as typed:
// `invalid value "-5m" for flag -older-than: negative duration`).
func NonNegative(p *time.Duration) flag.Value { return (*nonNegative)(p) }

type nonNegative time.Duration

func (d *nonNegative) String() string { return time.Duration(*d).String() }

func (d *nonNegative) Set(s string) error {
	v, err := ParseNonNegative(s)
	if err != nil {
		return err
	}
	*d = nonNegative(v)
	return nil
}

// maxSeconds is the largest bare number of seconds parseSeconds accepts:
// more would overflow a time.Duration (about 292 years).
const maxSeconds = int64(math.MaxInt64 / time.Second)

// parseSeconds accepts a duration ("15s") or a bare number of seconds. A
// number too large for a time.Duration is an error naming the value as
// typed, not a wrapped-around duration.
func parseSeconds(s string) (time.Duration, error) {
	n, err := strconv.ParseInt(s, 10, 64)
	if err == nil {
		if n > maxSeconds || n < -maxSeconds {
			return 0, fmt.Errorf("%s seconds is out of range (at most %d)", s, maxSeconds)
		}
		return time.Duration(n) * time.Second, nil
	}
	if errors.Is(err, strconv.ErrRange) {
		return 0, fmt.Errorf("%s seconds is out of range (at most %d)", s, maxSeconds)
	}
	d, err := time.ParseDuration(s)
	if err != nil {
		// "1.5" or "15 s": the usage says whole seconds, so say it again
		// rather than time's "missing unit in duration".
		return 0, errors.New("want whole seconds: a whole number (15) or a duration (15s)")
	}
	return d, nil
}

// password returns the password: Password, or the content of PasswordFile
// without its trailing newline.
func (c *Config) password() (string, error) {
	if c.PasswordFile == "" {
		return c.Password, nil
	}
	b, err := os.ReadFile(c.PasswordFile)
	if err != nil {
		return "", fmt.Errorf("password file: %w", err)
	}
	return strings.TrimRight(string(b), "\r\n"), nil
}

func splitList(s string) []string {
	var out []string
	for _, e := range strings.Split(s, ",") {
		if e = strings.TrimSpace(e); e != "" {
			out = append(out, e)
		}
	}
	return out
}

// RegisterFlags binds the connection flags (etcdctl's names where they
// exist) to c. Their defaults are c's current values, so call it after
// FromEnv.
func (c *Config) RegisterFlags(fs *flag.FlagSet) {
	c.places().RegisterFlags(fs)
	fs.Func("endpoints", "comma-separated etcd endpoints; none: the local embedded node ($"+EnvEndpoints+")", func(s string) error {
		c.Endpoints = splitList(s)
		return nil
	})
	fs.Func("ttl", fmt.Sprintf("lease TTL, whole seconds (default %v) ($%s)", c.TTL, EnvTTL), func(s string) error {
		d, err := parseSeconds(s)
		if err == nil {
			c.TTL = d
		}
		return err
	})
	fs.StringVar(&c.CACert, "cacert", c.CACert, "CA bundle to verify etcd's certificate ($"+EnvCACert+")")
	fs.StringVar(&c.Cert, "cert", c.Cert, "client certificate for etcd ($"+EnvCert+")")
	fs.StringVar(&c.Key, "key", c.Key, "client key for etcd ($"+EnvKey+")")
	fs.StringVar(&c.User, "user", c.User, "etcd user; password from $"+EnvPassword+" or --password-file ($"+EnvUser+")")
	fs.StringVar(&c.PasswordFile, "password-file", c.PasswordFile, "file holding the etcd password ($"+EnvPasswordFile+")")
	fs.StringVar(&c.Name, "host", c.Name, "host name recorded in builds and references ($"+EnvHost+")")
	fs.StringVar(&c.Cache, "cache", c.Cache, "remote cache URL: http(s)://[user:pass@]host/path, s3://bucket/prefix[?endpoint=URL] or file:///dir; bearer token from $"+EnvCacheToken+" ($"+EnvCache+")")
	fs.StringVar(&c.CacheCACert, "cache-cacert", c.CacheCACert, "CA bundle to verify an HTTPS cache ($"+EnvCacheCACert+")")
	fs.StringVar(&c.CacheSignKey, "cache-sign-key", c.CacheSignKey, "secret key file ('granary cache keygen') that signs the entries this host uploads ($"+EnvCacheSignKey+")")
	fs.StringVar(&c.CacheTrustedKeys, "cache-trusted-keys", c.CacheTrustedKeys, "public keys NAME:BASE64, space- or comma-separated; when set, only entries signed by one of them are used ($"+EnvCacheTrusted+")")
	fs.Func("cache-fetch-budget", fmt.Sprintf("longest a cache fetch may hold the build lock before the host builds instead (default %v) ($%s)", cache.DefaultFetchBudget, EnvCacheBudget), func(s string) error {
		d, err := parseSeconds(s)
		if err == nil {
			c.CacheFetchBudget = d
		}
		return err
	})
	fs.Var(NonNegative(&c.OpTimeout), "op-timeout", "deadline of each etcd call")
	fs.Var(NonNegative(&c.FailureRetention), "failure-retention", "keep the record of a failed build this long (default 24h) ($"+EnvFailureRetention+")")
	fs.Var(NonNegative(&c.YieldWait), "yield-wait", "how long a removal waits for other hosts' nodes to release a package they only keep lingering")
	fs.Var(NonNegative(&c.IdleTimeout), "idle-timeout", "embedded node: exit after this long with no client, 0: never ($"+EnvIdleTimeout+")")
}

// RegisterNodeFlags binds the flags only `serve` needs.
func (c *Config) RegisterNodeFlags(fs *flag.FlagSet) {
	fs.StringVar(&c.ListenMetrics, "listen-metrics", c.ListenMetrics, "address for /metrics, /healthz, /readyz (empty: off)")
	fs.Var(NonNegative(&c.Linger), "linger", "keep a package's etcd reference this long after its last local holder (0: release at once)")
	fs.Func("socket-mode", fmt.Sprintf("permissions of the local API socket, octal (default %#o)", c.SocketMode), func(s string) error {
		m, err := strconv.ParseUint(s, 8, 32)
		if err == nil {
			c.SocketMode = os.FileMode(m)
		}
		return err
	})
	fs.StringVar(&c.SocketGroup, "socket-group", c.SocketGroup, "group of the local API socket (with --socket-mode 0660)")
	fs.StringVar(&c.AdminGroup, "admin-group", c.AdminGroup, "group whose members may rm, pin, unpin and invalidate through the local API socket, besides root and the node's user ($"+EnvAdminGroup+")")
	fs.Var(NonNegative(&c.GCInterval), "gc-interval", "how often to prune (0: never)")
	fs.Var(NonNegative(&c.GC.OlderThan), "gc-older-than", "prune packages unused for this long")
	fs.Int64Var(&c.GC.TargetBytes, "gc-target-bytes", c.GC.TargetBytes, "prune oldest first while the store is larger (0: no target)")
	fs.DurationVar(&c.GC.Grace, "gc-grace", c.GC.Grace, "never prune what was used this recently (0: etcdstore's default, negative: none)")
	fs.IntVar(&c.GC.MaxRemovals, "gc-max", c.GC.MaxRemovals, "most packages removed per sweep (0: no limit)")
}

// places binds paths' resolution of the root, state directory and prefix
// (shared with cmd/granary-run) to c.
func (c *Config) places() paths.Places {
	return paths.Places{Root: &c.Root, StateDir: &c.StateDir, Prefix: &c.Prefix}
}

// Embedded reports whether c uses the embedded etcd (no endpoints).
func (c *Config) Embedded() bool { return len(c.Endpoints) == 0 }

// SocketPath is the embedded etcd's client socket in StateDir.
func (c *Config) SocketPath() string { return filepath.Join(c.StateDir, "etcd.sock") }

// AgentSocketPath is the node's local API socket in StateDir.
func (c *Config) AgentSocketPath() string { return agent.SocketPath(c.StateDir) }

// LocalEndpoint is the client URL of the embedded etcd.
func (c *Config) LocalEndpoint() string { return "unix://" + c.SocketPath() }

// Validate reports every bad value. It changes nothing in c, so it may be
// called more than once (the CLI validates before node.New does again); the
// password file is only checked for readability here and read at Dial time.
func (c *Config) Validate() error {
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }
	c.validatePaths(bad)
	if c.GC.TargetBytes < 0 || c.GC.OlderThan < 0 {
		// etcdstore reads these as "zero" (everything goes); a node's
		// periodic sweep never means that.
		bad("GC target %d bytes / age %v: want zero (off) or more", c.GC.TargetBytes, c.GC.OlderThan)
	}
	if c.SocketMode&^os.ModePerm != 0 {
		bad("socket mode %#o: want permission bits only", c.SocketMode)
	}
	if c.Root != "" && c.StateDir != "" {
		r, _ := filepath.Abs(c.Root)
		s, _ := filepath.Abs(c.StateDir)
		if r == s || strings.HasPrefix(s, r+string(filepath.Separator)) {
			bad("state directory %s is inside the shared root %s: etcd data must stay host-local", s, r)
		}
	}
	c.validateEtcd(bad)
	if c.Name == "" {
		bad("empty host name")
	}
	c.validateCache(bad)
	if c.GCInterval < 0 || c.IdleTimeout < 0 || c.Linger < 0 || c.YieldWait < 0 || c.OpTimeout <= 0 || c.DialTimeout <= 0 {
		bad("negative interval, or non-positive timeout")
	}
	if len(errs) > 0 {
		return fmt.Errorf("bad configuration: %w", errors.Join(errs...))
	}
	return nil
}

// validatePaths reports a missing root or state directory and socket
// paths too long for a unix socket, through bad.
func (c *Config) validatePaths(bad func(format string, args ...any)) {
	if c.Root == "" {
		bad("no shared root: set --root or $%s (no home directory to default to)", EnvRoot)
	}
	if c.StateDir == "" {
		bad("no state directory: set --state-dir or $%s (no home directory to default to)", EnvStateDir)
	} else if !filepath.IsAbs(c.StateDir) {
		bad("state directory %q must be an absolute path", c.StateDir)
	}
	if c.Embedded() && c.StateDir != "" && len(c.SocketPath()) >= MaxSocketPath {
		bad("socket path %s is %d bytes, too long for a unix socket (max %d): set a shorter --state-dir or $%s",
			c.SocketPath(), len(c.SocketPath()), MaxSocketPath, EnvStateDir)
	}
	if c.StateDir != "" && len(c.AgentSocketPath()) >= MaxSocketPath {
		bad("socket path %s is %d bytes, too long for a unix socket (max %d): set a shorter --state-dir or $%s",
			c.AgentSocketPath(), len(c.AgentSocketPath()), MaxSocketPath, EnvStateDir)
	}
}

// validateEtcd reports bad endpoints, prefix, TTL and credentials through
// bad.
func (c *Config) validateEtcd(bad func(format string, args ...any)) {
	for _, e := range c.Endpoints {
		if !strings.Contains(e, "://") {
			if _, _, err := net.SplitHostPort(e); err != nil {
				bad("endpoint %q: want host:port or a URL (http://, https://, unix://)", e)
			}
		}
	}
	if !strings.HasPrefix(c.Prefix, "/") || !strings.HasSuffix(c.Prefix, "/") {
		bad("prefix %q must start and end with '/'", c.Prefix)
	}
	if c.TTL < etcdstore.MinTTL || c.TTL%time.Second != 0 {
		bad("TTL %v must be whole seconds and at least %v", c.TTL, etcdstore.MinTTL)
	}
	if (c.Cert == "") != (c.Key == "") {
		bad("--cert and --key go together")
	}
	if c.Password != "" && c.PasswordFile != "" {
		bad("password given both in $%s and in a file; use one", EnvPassword)
	}
	if c.PasswordFile != "" {
		if _, err := c.password(); err != nil {
			bad("%v", err)
		}
	}
	if (c.Password != "" || c.PasswordFile != "") && c.User == "" {
		bad("a password without --user")
	}
}

// validateCache reports cache settings without a cache and a cache that
// does not open, through bad.
func (c *Config) validateCache(bad func(format string, args ...any)) {
	if (c.CacheToken != "" || c.CacheCACert != "" || c.CacheSignKey != "" || c.CacheTrustedKeys != "") && c.Cache == "" {
		bad("$%s, --cache-cacert, --cache-sign-key or --cache-trusted-keys set without a cache URL (--cache or $%s)", EnvCacheToken, EnvCache)
	}
	if c.CacheFetchBudget < 0 {
		bad("negative cache fetch budget %v", c.CacheFetchBudget)
	}
	if c.Cache != "" {
		if r, err := c.OpenCache(); err != nil {
			bad("%v", err)
		} else {
			r.Close()
		}
	}
}
