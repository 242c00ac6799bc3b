package cache

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"
)

// Environment variables NewS3 reads, as the AWS SDKs and CLI do.
const (
	EnvS3Endpoint     = "AWS_ENDPOINT_URL_S3" // endpoint of an S3-compatible server
	EnvEndpoint       = "AWS_ENDPOINT_URL"    // the same, for every AWS service
	EnvRegion         = "AWS_REGION"
	EnvDefaultRegion  = "AWS_DEFAULT_REGION"
	defaultS3Endpoint = "https://s3.amazonaws.com"
)

// NewS3 returns a cache in an S3 bucket, or in a bucket of an
// S3-compatible server (SeaweedFS, MinIO, Ceph RGW, Garage, R2…):
//
//	s3://bucket/prefix[?endpoint=http://host:port&region=name]
//
// Objects are <prefix>/<id>.tar.zst and <prefix>/<id>.json. The endpoint is
// the URL's endpoint parameter, else $AWS_ENDPOINT_URL_S3, else
// $AWS_ENDPOINT_URL, else AWS itself; a custom endpoint is addressed
// path-style (http://host/bucket/key), which every S3-compatible server
// understands. The region is the region parameter, else $AWS_REGION or
// $AWS_DEFAULT_REGION, else us-east-1 for a custom endpoint and asked of
// AWS otherwise.
//
// Credentials come from the usual chain, first found wins:
// $AWS_ACCESS_KEY_ID and $AWS_SECRET_ACCESS_KEY (and $AWS_SESSION_TOKEN),
// the shared credentials file (~/.aws/credentials, $AWS_PROFILE), then the
// instance's or container's role (EC2 instance metadata, ECS task role,
// EKS web identity). With none of them, requests are anonymous.
//
// Uploads stream: the archive is packed while it is sent, in a multipart
// upload of WithPartSize parts (one part in memory at a time), which S3
// makes visible in one step when it completes; an upload that fails is
// aborted and leaves no object. Downloads stream. Every request has the
// deadlines of WithTimeout (connecting, the answer's headers, any pause of
// a transfer) and is retried by the client library on transient errors
// (WithRetries). It does no network I/O.
func NewS3(rawURL string, opts ...Option) (*Remote, error) {
	o, err := newOptions(opts)
	if err != nil {
		return nil, err
	}
	u, err := url.Parse(rawURL)
	if err != nil {
		return nil, fmt.Errorf("cache URL %q: %w", redact(rawURL), err)
	}
	if u.Scheme != "s3" || u.Host == "" || u.User != nil || u.Fragment != "" {
		return nil, fmt.Errorf("cache URL %q: want s3://bucket/prefix", redact(rawURL))
	}
	q := u.Query()
	for k := range q {
		if k != "endpoint" && k != "region" {
			return nil, fmt.Errorf("cache URL %q: unknown parameter %q (want endpoint or region)", redact(rawURL), k)
		}
	}
	endpoint := firstNonEmpty(q.Get("endpoint"), os.Getenv(EnvS3Endpoint), os.Getenv(EnvEndpoint))
	custom := endpoint != ""
	if !custom {
		endpoint = defaultS3Endpoint
	}
	ep, err := url.Parse(endpoint)
	if err != nil || (ep.Scheme != "http" && ep.Scheme != "https") || ep.Host == "" || strings.Trim(ep.Path, "/") != "" {
		return nil, fmt.Errorf("cache S3 endpoint %q: want http(s)://host[:port]", endpoint)
	}
	region := firstNonEmpty(q.Get("region"), os.Getenv(EnvRegion), os.Getenv(EnvDefaultRegion))
	if region == "" && custom {
		region = "us-east-1"
	}
	lookup := minio.BucketLookupAuto
	if custom {
		lookup = minio.BucketLookupPath
	}

	// S3 clients stay on HTTP/1.1: a stalled HTTP/2 connection would
	// stall every request multiplexed on it.
	tr, err := o.transport()
	if err != nil {
		return nil, err
	}
	creds := credentials.NewChainCredentials([]credentials.Provider{
		&credentials.EnvAWS{},
		&credentials.FileAWSCredentials{},
		&credentials.IAM{Client: &http.Client{Transport: tr}},
	})
	client, err := minio.New(ep.Host, &minio.Options{
		Creds:        creds,
		Secure:       ep.Scheme == "https",
		Transport:    &stallTransport{base: tr, d: o.timeout},
		Region:       region,
		BucketLookup: lookup,
		MaxRetries:   o.retries + 1, // minio-go counts the first try
	})
	if err != nil {
		return nil, fmt.Errorf("cache S3 client for %s: %w", redact(rawURL), err)
	}
	prefix := strings.Trim(u.Path, "/")
	if prefix != "" {
		prefix += "/"
	}
	desc := "s3://" + u.Host + "/" + prefix
	if custom {
		desc += " at " + ep.Scheme + "://" + ep.Host
	}
	return newRemote(&s3Backend{client: client, tr: tr, bucket: u.Host, prefix: prefix, desc: desc, partSize: o.partSize}, o), nil
}

func firstNonEmpty(s ...string) string {
	for _, v := range s {
		if v != "" {
			return v
		}
	}
	return ""
}

type s3Backend struct {
	client   *minio.Client
	tr       *http.Transport
	bucket   string
	prefix   string // "" or ends in '/'
	desc     string
	partSize uint64
}

func (s *s3Backend) String() string { return s.desc }

func (s *s3Backend) close() { s.tr.CloseIdleConnections() }

func (s *s3Backend) key(name string) string { return s.prefix + name }

// s3Err maps a missing object to errNotFound. A missing bucket is an
// error (a misconfiguration, not a miss): servers answer a HEAD of a key
// in a missing bucket with a bare 404, which reads as NoSuchKey, so a
// NoSuchKey is checked against the bucket (one more request, on misses
// only).
func (s *s3Backend) s3Err(ctx context.Context, err error) error {
	switch minio.ToErrorResponse(err).Code {
	case minio.NoSuchKey:
		ok, berr := s.client.BucketExists(ctx, s.bucket)
		if berr != nil {
			return fmt.Errorf("%w (and checking the bucket: %w)", err, berr)
		}
		if !ok {
			return fmt.Errorf("bucket %q does not exist", s.bucket)
		}
		return errNotFound
	case "NoSuchBucket":
		return fmt.Errorf("bucket %q does not exist: %w", s.bucket, err)
	}
	return err
}

func (s *s3Backend) open(ctx context.Context, name string) (io.ReadCloser, error) {
	// Core's GET: one request, its error at once, the body streamed
	// (the Object of Client.GetObject would HEAD first).
	body, _, _, err := minio.Core{Client: s.client}.GetObject(ctx, s.bucket, s.key(name), minio.GetObjectOptions{})
	if err != nil {
		return nil, s.s3Err(ctx, err)
	}
	return body, nil
}

func (s *s3Backend) exists(ctx context.Context, name string) (bool, error) {
	_, err := s.client.StatObject(ctx, s.bucket, s.key(name), minio.StatObjectOptions{})
	if err := s.s3Err(ctx, err); errors.Is(err, errNotFound) {
		return false, nil
	} else if err != nil {
		return false, err
	}
	return true, nil
}

// write streams what fill writes into a multipart upload through a pipe.
// If fill fails, the upload reads its error, aborts, and no object
// appears; if the upload fails, fill's writes fail and it returns.
func (s *s3Backend) write(ctx context.Context, name string, fill func(io.Writer) error) error {
	if strings.HasSuffix(name, ".json") { // an index: small, one PUT
		var buf bytes.Buffer
		if err := fill(&buf); err != nil {
			return err
		}
		return s.writeSmall(ctx, name, buf.Bytes())
	}
	pr, pw := io.Pipe()
	var fillErr error
	var wg sync.WaitGroup
	wg.Go(func() {
		fillErr = fill(&ctxWriter{ctx: ctx, w: pw})
		pw.CloseWithError(fillErr) // nil: EOF
	})
	_, err := s.client.PutObject(ctx, s.bucket, s.key(name), pr, -1, minio.PutObjectOptions{
		PartSize:    s.partSize,
		ContentType: contentType(name),
	})
	pr.CloseWithError(errors.New("upload ended")) // unblock fill if the upload gave up
	wg.Wait()
	if fillErr != nil || err != nil {
		// The library aborts the upload it knows; a retried initiation
		// whose first answer was lost (stallTransport) can leave another
		// open upload of the key, which only a listing finds. Detached:
		// a cancelled Store must still clean up.
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
		if rerr := s.client.RemoveIncompleteUpload(cctx, s.bucket, s.key(name)); rerr != nil {
			err = errors.Join(err, fmt.Errorf("abort the open uploads of %s: %w", name, rerr))
		}
		cancel()
	}
	if fillErr != nil {
		return fillErr
	}
	return err
}

// writeSmall stores a small object in one PUT (the index).
func (s *s3Backend) writeSmall(ctx context.Context, name string, b []byte) error {
	_, err := s.client.PutObject(ctx, s.bucket, s.key(name), bytes.NewReader(b), int64(len(b)), minio.PutObjectOptions{
		ContentType: contentType(name),
	})
	return err
}

func contentType(name string) string {
	if strings.HasSuffix(name, ".json") {
		return "application/json"
	}
	return "application/zstd"
}

// stallTransport puts every request under a watchdog: a request whose
// transfer makes no progress (no byte sent or received, no answer) for d
// is cancelled, and the client library retries it.
type stallTransport struct {
	base http.RoundTripper
	d    time.Duration
}

func (t *stallTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	w := newWatch(req.Context(), t.d)
	out := req.WithContext(w.ctx)
	if req.Body != nil && req.Body != http.NoBody {
		out.Body = &touching{rc: req.Body, r: w}
	}
	res, err := t.base.RoundTrip(out)
	if err != nil {
		w.end()
		return nil, w.err(err)
	}
	w.touch()
	res.Body = &watched{touching{rc: res.Body, r: w}}
	return res, nil
}
