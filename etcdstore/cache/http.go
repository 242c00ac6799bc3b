package cache

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/cenkalti/backoff/v4"
)

// NewHTTP returns a cache on a plain HTTP file server that answers GET and
// HEAD and accepts PUT (nginx with dav_methods PUT, an S3-style gateway):
// objects are <base>/<id>.tar.zst and <base>/<id>.json. Credentials in the
// URL (https://user:pass@host/) are sent as basic auth. It does no network
// I/O.
//
// Every request has deadlines (WithTimeout): connecting, waiting for the
// response headers, and any pause of the transfer. Connection errors,
// timeouts, 5xx, 408 and 429 are retried with exponential backoff
// (WithRetries); 404 is a miss; any other answer is an error at once.
// Uploads are packed into a temporary file first, so that their length is
// known and a retry can send them again; downloads stream.
func NewHTTP(baseURL string, opts ...Option) (*Remote, error) {
	o, err := newOptions(opts)
	if err != nil {
		return nil, err
	}
	u, err := url.Parse(baseURL)
	if err != nil {
		return nil, fmt.Errorf("cache URL %q: %w", redact(baseURL), err)
	}
	if u.Scheme != "http" && u.Scheme != "https" || u.Host == "" {
		return nil, fmt.Errorf("cache URL %q: want http(s)://host[/path]", redact(baseURL))
	}
	if u.RawQuery != "" || u.Fragment != "" {
		return nil, fmt.Errorf("cache URL %q: no query or fragment allowed", redact(baseURL))
	}
	if u.User != nil {
		if o.token != "" {
			return nil, fmt.Errorf("cache URL %q has credentials and a bearer token is set; use one", redact(baseURL))
		}
		if !o.hasBasic {
			p, _ := u.User.Password()
			o.user, o.password, o.hasBasic = u.User.Username(), p, true
		}
		u.User = nil
	}
	if !strings.HasSuffix(u.Path, "/") {
		u.Path += "/"
		u.RawPath = ""
	}
	tr, err := o.transport()
	if err != nil {
		return nil, err
	}
	tr.ForceAttemptHTTP2 = true
	return newRemote(&httpBackend{base: u, client: &http.Client{Transport: tr}, o: o}, o), nil
}

type httpBackend struct {
	base   *url.URL // no user information; path ends in '/'
	client *http.Client
	o      options
}

func (h *httpBackend) String() string { return h.base.String() }

func (h *httpBackend) close() { h.client.CloseIdleConnections() }

func (h *httpBackend) url(name string) string {
	return h.base.JoinPath(name).String()
}

// errStalled ends a transfer that made no progress for the timeout.
var errStalled = errors.New("no progress")

// request is one HTTP exchange under a watchdog: it is cancelled when no
// byte moved (and no headers came) for the timeout.
type request struct {
	ctx    context.Context
	cancel context.CancelCauseFunc
	timer  *time.Timer
	d      time.Duration
	once   sync.Once
}

func (h *httpBackend) newRequest(ctx context.Context) *request { return newWatch(ctx, h.o.timeout) }

// newWatch starts a request's watchdog: its context is cancelled with
// errStalled when touch is not called for d.
func newWatch(ctx context.Context, d time.Duration) *request {
	r := &request{d: d}
	r.ctx, r.cancel = context.WithCancelCause(ctx)
	r.timer = time.AfterFunc(r.d, func() {
		r.cancel(fmt.Errorf("%w for %v", errStalled, r.d))
	})
	return r
}

func (r *request) touch() { r.timer.Reset(r.d) }

func (r *request) end() {
	r.once.Do(func() {
		r.timer.Stop()
		r.cancel(context.Canceled)
	})
}

// err returns why the request's context ended, if it did: the watchdog's
// errStalled, or the caller's cancellation.
func (r *request) err(err error) error {
	if cause := context.Cause(r.ctx); cause != nil && !errors.Is(err, cause) {
		return fmt.Errorf("%w (%v)", err, cause)
	}
	return err
}

// touching wraps a body so that each read resets the watchdog; the
// request goes on when it is closed. For uploads: the client closes the
// request body once sent, long before the answer.
type touching struct {
	rc io.ReadCloser
	r  *request
}

func (t *touching) Read(p []byte) (int, error) {
	n, err := t.rc.Read(p)
	if n > 0 {
		t.r.touch()
	}
	if err != nil && err != io.EOF {
		err = t.r.err(err)
	}
	return n, err
}

func (t *touching) Close() error { return t.rc.Close() }

// watched is a response body: closing it ends the request.
type watched struct{ touching }

func (w *watched) Close() error {
	err := w.rc.Close()
	w.r.end()
	return err
}

// do runs method on name with retries. body, if not nil, makes a fresh body
// for each attempt. On success (2xx) the response is returned with a
// watched body that the caller must close; 404 is errNotFound.
func (h *httpBackend) do(ctx context.Context, method, name string, body func() io.ReadCloser, size int64) (*http.Response, error) {
	var resp *http.Response
	bo := backoff.NewExponentialBackOff()
	bo.InitialInterval = 200 * time.Millisecond
	bo.MaxInterval = 5 * time.Second
	bo.MaxElapsedTime = 0 // the count of retries and ctx bound it
	op := func() error {
		r := h.newRequest(ctx)
		req, err := http.NewRequestWithContext(r.ctx, method, h.url(name), nil)
		if err != nil {
			r.end()
			return backoff.Permanent(err)
		}
		if body != nil {
			req.Body = &touching{rc: body(), r: r}
			req.ContentLength = size
			req.GetBody = func() (io.ReadCloser, error) { return &touching{rc: body(), r: r}, nil }
		}
		switch {
		case h.o.token != "":
			req.Header.Set("Authorization", "Bearer "+h.o.token)
		case h.o.hasBasic:
			req.SetBasicAuth(h.o.user, h.o.password)
		}
		res, err := h.client.Do(req)
		if err != nil {
			r.end()
			var certErr *tls.CertificateVerificationError
			switch {
			case ctx.Err() != nil:
				return backoff.Permanent(ctx.Err())
			case errors.As(err, &certErr):
				return backoff.Permanent(err) // trying again will not help
			}
			return r.err(err) // connection error or timeout: transient
		}
		r.touch()
		res.Body = &watched{touching{rc: res.Body, r: r}}
		switch {
		case res.StatusCode >= 200 && res.StatusCode < 300:
			resp = res
			return nil
		case res.StatusCode == http.StatusNotFound:
			drain(res)
			return backoff.Permanent(errNotFound)
		}
		err = fmt.Errorf("%s %s: %s%s", method, h.url(name), res.Status, snippet(res))
		if res.StatusCode >= 500 || res.StatusCode == http.StatusRequestTimeout || res.StatusCode == http.StatusTooManyRequests {
			return err
		}
		return backoff.Permanent(err)
	}
	err := backoff.Retry(op, backoff.WithContext(backoff.WithMaxRetries(bo, uint64(h.o.retries)), ctx))
	return resp, err
}

// snippet reads the start of an error response's body for the message, and
// closes it.
func snippet(res *http.Response) string {
	defer res.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(res.Body, 200))
	s := strings.Join(strings.Fields(string(b)), " ")
	if s == "" {
		return ""
	}
	return ": " + s
}

func drain(res *http.Response) {
	io.Copy(io.Discard, io.LimitReader(res.Body, 4096)) //nolint:errcheck // only to reuse the connection
	res.Body.Close()
}

func (h *httpBackend) open(ctx context.Context, name string) (io.ReadCloser, error) {
	res, err := h.do(ctx, http.MethodGet, name, nil, 0)
	if err != nil {
		return nil, err
	}
	return res.Body, nil
}

func (h *httpBackend) exists(ctx context.Context, name string) (bool, error) {
	res, err := h.do(ctx, http.MethodHead, name, nil, 0)
	if errors.Is(err, errNotFound) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	drain(res)
	return true, nil
}

func (h *httpBackend) write(ctx context.Context, name string, fill func(io.Writer) error) error {
	tmp, err := os.CreateTemp(h.o.tempDir, "granary-cache-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	defer tmp.Close()
	if err := fill(&ctxWriter{ctx: ctx, w: tmp}); err != nil {
		return err
	}
	size, err := tmp.Seek(0, io.SeekCurrent)
	if err != nil {
		return err
	}
	body := func() io.ReadCloser { return io.NopCloser(io.NewSectionReader(tmp, 0, size)) }
	res, err := h.do(ctx, http.MethodPut, name, body, size)
	if errors.Is(err, errNotFound) {
		err = fmt.Errorf("PUT %s: 404 Not Found (does the server accept PUT, and create the base path?)", h.url(name))
	}
	if err != nil {
		return err
	}
	drain(res)
	return nil
}

// transport is the HTTP transport of a remote cache: TLS with the
// configured CA, and the connect, handshake and header deadlines.
func (o *options) transport() (*http.Transport, error) {
	tlsCfg := &tls.Config{MinVersion: tls.VersionTLS12, InsecureSkipVerify: o.insecure}
	if o.caFile != "" {
		pem, err := os.ReadFile(o.caFile)
		if err != nil {
			return nil, fmt.Errorf("cache CA file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("cache CA file %s holds no PEM certificate", o.caFile)
		}
		tlsCfg.RootCAs = pool
	}
	return &http.Transport{
		Proxy:                 http.ProxyFromEnvironment,
		DialContext:           (&net.Dialer{Timeout: min(o.timeout, MaxConnectTimeout), KeepAlive: 30 * time.Second}).DialContext,
		TLSClientConfig:       tlsCfg,
		TLSHandshakeTimeout:   o.timeout,
		ResponseHeaderTimeout: o.timeout,
		ExpectContinueTimeout: time.Second,
		IdleConnTimeout:       90 * time.Second,
		MaxIdleConnsPerHost:   4,
	}, nil
}
