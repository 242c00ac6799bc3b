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
)

func newOptions(opts []Option) (options, error) {
	o := options{limits: DefaultLimits(), timeout: DefaultTimeout, retries: DefaultRetries}
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
	if o.token != "" && o.hasBasic {
		errs = append(errs, errors.New("both a bearer token and basic auth given; use one"))
	}
	if len(errs) > 0 {
		return o, fmt.Errorf("cache: %w", errors.Join(errs...))
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

// Open returns the cache at rawURL: http:// or https:// for an HTTP file
// server that accepts PUT (NewHTTP), file:///path for a directory (NewDir).
// It does no network I/O.
func Open(rawURL string, opts ...Option) (*Remote, error) {
	u, err := url.Parse(rawURL)
	if err != nil {
		return nil, fmt.Errorf("cache: URL %q: %w", redact(rawURL), err)
	}
	switch strings.ToLower(u.Scheme) {
	case "http", "https":
		return NewHTTP(rawURL, opts...)
	case "file":
		if u.Host != "" && u.Host != "localhost" {
			return nil, fmt.Errorf("cache: URL %q: a file URL names no host (file:///path)", redact(rawURL))
		}
		if u.Path == "" || !filepath.IsAbs(u.Path) {
			return nil, fmt.Errorf("cache: URL %q: want an absolute path (file:///path)", redact(rawURL))
		}
		return NewDir(u.Path, opts...)
	case "":
		return nil, fmt.Errorf("cache: URL %q has no scheme; want http://, https:// or file:///path", redact(rawURL))
	default:
		return nil, fmt.Errorf("cache: URL %q: unsupported scheme %q; want http://, https:// or file:///path", redact(rawURL), u.Scheme)
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
