package cache

import (
	"errors"
	"fmt"
	"net/url"
	"path/filepath"
	"strings"
	"time"
)

// Option configures a Remote.
type Option func(*options)

type options struct {
	limits   Limits
	timeout  time.Duration
	retries  int
	caFile   string
	insecure bool
	token    string
	user     string
	password string
	hasBasic bool
	tempDir  string
	signKey  *SecretKey
	trusted  []PublicKey
	budget   time.Duration
	progress func(Progress)
	partSize uint64
}

// Defaults.
const (
	// DefaultTimeout bounds connecting, each response's headers, and any
	// pause of a transfer (no byte moved for this long ends it).
	DefaultTimeout = 30 * time.Second
	// MaxConnectTimeout caps the time to open a connection.
	MaxConnectTimeout = 5 * time.Second
	// DefaultRetries is how many times a request that failed transiently
	// (connection error, timeout, 5xx, 408, 429) is tried again.
	DefaultRetries = 4
	// DefaultFetchBudget bounds a whole Fetch (index, archive, unpack,
	// checks), whatever the retries and per-request deadlines add up to:
	// Build holds the package's build lock while it fetches, and every
	// host that wants the package waits meanwhile.
	DefaultFetchBudget = 60 * time.Second
	// DefaultPartSize is the size of one part of an S3 multipart upload,
	// and so the memory an upload buffers.
	DefaultPartSize = 16 << 20
)

func newOptions(opts []Option) (options, error) {
	o := options{limits: DefaultLimits(), timeout: DefaultTimeout, retries: DefaultRetries,
		budget: DefaultFetchBudget, partSize: DefaultPartSize}
	for _, fn := range opts {
		fn(&o)
	}
	var errs []error
	if err := o.limits.validate(); err != nil {
		errs = append(errs, err)
	}
	if o.timeout <= 0 {
		errs = append(errs, fmt.Errorf("timeout %v must be positive", o.timeout))
	}
	if o.retries < 0 {
		errs = append(errs, fmt.Errorf("retries %d must not be negative", o.retries))
	}
	if o.budget <= 0 {
		errs = append(errs, fmt.Errorf("fetch budget %v must be positive", o.budget))
	}
	if o.partSize < 5<<20 || o.partSize > 5<<30 {
		errs = append(errs, fmt.Errorf("S3 part size %d must be between 5 MiB and 5 GiB", o.partSize))
	}
	if o.token != "" && o.hasBasic {
		errs = append(errs, errors.New("both a bearer token and basic auth given; use one"))
	}
	if len(errs) > 0 {
		return o, fmt.Errorf("cache options: %w", errors.Join(errs...))
	}
	return o, nil
}

// WithLimits sets what Fetch accepts from an archive (DefaultLimits).
func WithLimits(l Limits) Option { return func(o *options) { o.limits = l } }

// WithTimeout sets the HTTP deadline of connecting, of waiting for a
// response's headers, and of any pause in a transfer (DefaultTimeout).
// Connecting takes at most MaxConnectTimeout whatever d is: a cache host
// that drops packets should not hold every build's lock for minutes. A
// transfer that keeps moving is bounded only by the caller's context.
func WithTimeout(d time.Duration) Option { return func(o *options) { o.timeout = d } }

// WithRetries sets how many times an HTTP request that failed transiently
// is tried again, with exponential backoff (DefaultRetries). 4xx answers
// are never retried.
func WithRetries(n int) Option { return func(o *options) { o.retries = n } }

// WithCAFile makes HTTPS trust the PEM certificates in path (instead of the
// system's).
func WithCAFile(path string) Option { return func(o *options) { o.caFile = path } }

// WithInsecureSkipVerify turns off HTTPS certificate verification. For tests
// and trusted networks only.
func WithInsecureSkipVerify() Option { return func(o *options) { o.insecure = true } }

// WithBearerToken sends "Authorization: Bearer token" with every request.
func WithBearerToken(token string) Option { return func(o *options) { o.token = token } }

// WithBasicAuth sends HTTP basic credentials with every request. A URL's
// user information (https://user:pass@host/) does the same.
func WithBasicAuth(user, password string) Option {
	return func(o *options) { o.user, o.password, o.hasBasic = user, password, true }
}

// WithTempDir sets where an HTTP upload is packed before it is sent (so
// its length is known and a retry can send it again); default os.TempDir().
func WithTempDir(dir string) Option { return func(o *options) { o.tempDir = dir } }

// WithSignKey makes Store sign each entry's index with k (see Index and
// docs/cache.md). Fetch does not need it.
func WithSignKey(k *SecretKey) Option { return func(o *options) { o.signKey = k } }

// WithTrustedKeys makes Fetch accept only entries whose index carries a
// valid signature by one of keys, and whose archive matches the signed
// length and SHA-256 before anything is unpacked. Any other entry is
// refused with a *RejectedError (a miss for Build: it builds instead) and
// counted in Stats.Rejected. No keys (the default) means no signature is
// required, as before signatures existed.
func WithTrustedKeys(keys ...PublicKey) Option {
	return func(o *options) { o.trusted = append(o.trusted, keys...) }
}

// WithFetchBudget bounds the whole of each Fetch (DefaultFetchBudget):
// when it runs out, Fetch gives up with an error matching ErrFetchBudget
// and Build runs the builder, so a cache that accepts connections and
// stalls holds the build lock for at most d.
func WithFetchBudget(d time.Duration) Option { return func(o *options) { o.budget = d } }

// WithProgress makes Fetch report the bytes downloaded so far to fn about
// once a second while it transfers an archive (for a waiting line); fn
// must return quickly.
func WithProgress(fn func(Progress)) Option { return func(o *options) { o.progress = fn } }

// WithPartSize sets the part size of S3 multipart uploads
// (DefaultPartSize, at least 5 MiB): an upload holds one part in memory.
func WithPartSize(n uint64) Option { return func(o *options) { o.partSize = n } }

// Open returns the cache at rawURL: http:// or https:// for an HTTP file
// server that accepts PUT (NewHTTP), file:///path for a directory (NewDir),
// s3://bucket/prefix for S3 or an S3-compatible server (NewS3). It does no
// network I/O.
func Open(rawURL string, opts ...Option) (*Remote, error) {
	u, err := url.Parse(rawURL)
	if err != nil {
		return nil, fmt.Errorf("cache URL %q: %w", redact(rawURL), err)
	}
	switch strings.ToLower(u.Scheme) {
	case "http", "https":
		return NewHTTP(rawURL, opts...)
	case "file":
		if u.Host != "" && u.Host != "localhost" {
			return nil, fmt.Errorf("cache URL %q: a file URL names no host (file:///path)", redact(rawURL))
		}
		if u.Path == "" || !filepath.IsAbs(u.Path) {
			return nil, fmt.Errorf("cache URL %q: want an absolute path (file:///path)", redact(rawURL))
		}
		return NewDir(u.Path, opts...)
	case "s3":
		return NewS3(rawURL, opts...)
	case "":
		return nil, fmt.Errorf("cache URL %q has no scheme; want http://, https://, s3://bucket/prefix or file:///path", redact(rawURL))
	default:
		return nil, fmt.Errorf("cache URL %q: unsupported scheme %q; want http://, https://, s3://bucket/prefix or file:///path", redact(rawURL), u.Scheme)
	}
}

// redact hides a password in a URL for messages.
func redact(rawURL string) string {
	u, err := url.Parse(rawURL)
	if err != nil {
		if i := strings.LastIndex(rawURL, "@"); i >= 0 {
			return "…@" + rawURL[i+1:]
		}
		return rawURL
	}
	return u.Redacted()
}
