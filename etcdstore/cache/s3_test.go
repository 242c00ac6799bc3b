package cache_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"

	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/etcdstore/cache"
)

// Credentials of the test S3 server's only identity.
const (
	s3AccessKey = "granary-test"
	s3SecretKey = "granary-test-secret"
)

// seaweed is a real SeaweedFS server (weed mini: master, volume, filer and
// S3 gateway in one process) serving a temporary directory.
type seaweed struct {
	endpoint string // http://127.0.0.1:port of the S3 gateway
	client   *minio.Client
}

// weedBinary finds the weed binary: $GRANARY_TEST_WEED, else weed on PATH.
// .ci/run builds it from the Go module github.com/seaweedfs/seaweedfs.
func weedBinary() string {
	if p := os.Getenv("GRANARY_TEST_WEED"); p != "" {
		return p
	}
	if p, err := exec.LookPath("weed"); err == nil {
		return p
	}
	return ""
}

// startSeaweed runs SeaweedFS on free loopback ports for the life of t,
// with one identity (s3AccessKey) and the bucket "granary", or skips t
// loudly when there is no weed binary.
func startSeaweed(t testing.TB) *seaweed {
	t.Helper()
	bin := weedBinary()
	if bin == "" {
		t.Skip("\n\n*** SKIPPED: no SeaweedFS weed binary ($GRANARY_TEST_WEED or weed on PATH), so the S3 cache is NOT tested against a real server.\n" +
			"*** .ci/run builds it; see docs/cache.md. ***\n\n")
	}
	dir := t.TempDir()
	conf := fmt.Sprintf(`{"identities":[{"name":"granary","credentials":[{"accessKey":%q,"secretKey":%q}],"actions":["Admin","Read","Write","List","Tagging"]}]}`,
		s3AccessKey, s3SecretKey)
	writeFile(t, filepath.Join(dir, "s3.json"), conf)
	data := filepath.Join(dir, "data")
	if err := os.Mkdir(data, 0o755); err != nil {
		t.Fatal(err)
	}
	s3Port := freePort(t)
	args := []string{"mini", "-dir=" + data, "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
		"-master.telemetry=false", "-webdav=false", "-admin.ui=false",
		"-s3.config=" + filepath.Join(dir, "s3.json"), "-s3.port.iceberg=0", "-s3.port.lance=0",
		"-bucket=granary",
		fmt.Sprintf("-s3.port=%d", s3Port), fmt.Sprintf("-s3.port.grpc=%d", freePort(t)),
		fmt.Sprintf("-master.port=%d", freePort(t)), fmt.Sprintf("-master.port.grpc=%d", freePort(t)),
		fmt.Sprintf("-volume.port=%d", freePort(t)), fmt.Sprintf("-volume.port.grpc=%d", freePort(t)),
		fmt.Sprintf("-filer.port=%d", freePort(t)), fmt.Sprintf("-filer.port.grpc=%d", freePort(t)),
		"-filer.localSocket=" + filepath.Join(dir, "filer.sock"), "-s3.localSocket=" + filepath.Join(dir, "s3.sock"),
	}
	cmd := exec.Command(bin, args...)
	cmd.Dir = dir
	logf, err := os.Create(filepath.Join(dir, "weed.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		syscall.Kill(-cmd.Process.Pid, syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(15 * time.Second):
			syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-exited
		}
		if t.Failed() {
			if b, err := os.ReadFile(filepath.Join(dir, "weed.log")); err == nil {
				t.Logf("weed log (end):\n%s", tail(b, 4000))
			}
		}
	})
	sw := &seaweed{endpoint: fmt.Sprintf("http://127.0.0.1:%d", s3Port)}
	sw.client, err = minio.New(fmt.Sprintf("127.0.0.1:%d", s3Port), &minio.Options{
		Creds: credentials.NewStaticV4(s3AccessKey, s3SecretKey, ""), Region: "us-east-1", BucketLookup: minio.BucketLookupPath,
	})
	if err != nil {
		t.Fatal(err)
	}
	// Ready when the bucket answers a listing (the filer and volume
	// server come up after the gateway).
	deadline := time.Now().Add(90 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		ok, err := sw.client.BucketExists(ctx, "granary")
		if ok {
			_, err = sw.client.PutObject(ctx, "granary", "ready", bytes.NewReader([]byte("ok")), 2, minio.PutObjectOptions{})
		}
		cancel()
		if ok && err == nil {
			break
		}
		select {
		case err := <-exited:
			b, _ := os.ReadFile(filepath.Join(dir, "weed.log"))
			t.Fatalf("weed exited: %v\n%s", err, tail(b, 4000))
		default:
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(filepath.Join(dir, "weed.log"))
			t.Fatalf("SeaweedFS not ready in 90s (last: %v, %v)\n%s", ok, err, tail(b, 4000))
		}
		time.Sleep(200 * time.Millisecond)
	}
	return sw
}

func tail(b []byte, n int) string {
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(b)
}

// url is the cache URL of prefix in bucket.
func (s *seaweed) url(bucket, prefix string) string {
	return "s3://" + bucket + "/" + prefix + "?endpoint=" + s.endpoint
}

// open opens a cache on the server with the test identity's credentials
// (from the environment, as the credentials chain finds them).
func (s *seaweed) open(t testing.TB, bucket, prefix string, opts ...cache.Option) *cache.Remote {
	t.Helper()
	return openHTTP(t, s.url(bucket, prefix), opts...)
}

// s3Objects reaches the raw objects under a prefix, to damage entries.
type s3Objects struct {
	sw     *seaweed
	prefix string
}

func (o s3Objects) get(t *testing.T, name string) []byte {
	t.Helper()
	obj, err := o.sw.client.GetObject(context.Background(), "granary", o.prefix+name, minio.GetObjectOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer obj.Close()
	b, err := io.ReadAll(obj)
	if err != nil {
		t.Fatalf("get %s: %v", name, err)
	}
	return b
}

func (o s3Objects) put(t *testing.T, name string, b []byte) {
	t.Helper()
	if _, err := o.sw.client.PutObject(context.Background(), "granary", o.prefix+name, bytes.NewReader(b), int64(len(b)), minio.PutObjectOptions{}); err != nil {
		t.Fatalf("put %s: %v", name, err)
	}
}

func s3Env(t *testing.T) {
	t.Setenv("AWS_ACCESS_KEY_ID", s3AccessKey)
	t.Setenv("AWS_SECRET_ACCESS_KEY", s3SecretKey)
	t.Setenv("AWS_SESSION_TOKEN", "")
	t.Setenv("AWS_ENDPOINT_URL_S3", "")
	t.Setenv("AWS_ENDPOINT_URL", "")
}

// bigTree is a published tree of n MiB of random (incompressible) data.
func bigTree(t *testing.T, n int) (string, etcdstore.PackageRecord) {
	t.Helper()
	dir := t.TempDir()
	buf := make([]byte, 1<<20)
	for i := range n {
		rand.Read(buf)
		writeFile(t, filepath.Join(dir, fmt.Sprintf("blob%02d", i)), string(buf))
	}
	d, size, err := etcdstore.TreeDigest(dir)
	if err != nil {
		t.Fatal(err)
	}
	return dir, etcdstore.PackageRecord{Digest: d, Size: size}
}

func TestS3SeaweedFS(t *testing.T) {
	sw := startSeaweed(t)
	s3Env(t)
	ctx := context.Background()

	t.Run("round trip", func(t *testing.T) {
		r := sw.open(t, "granary", "rt")
		src, rec := published(t)
		if ok, err := r.Fetch(ctx, "pkg", t.TempDir()); ok || err != nil {
			t.Fatalf("Fetch before Store = %v, %v; want a miss", ok, err)
		}
		if ok, err := r.Contains(ctx, "pkg"); ok || err != nil {
			t.Fatalf("Contains before Store = %v, %v; want false", ok, err)
		}
		if err := r.Store(ctx, "pkg", src, rec); err != nil {
			t.Fatalf("Store: %v", err)
		}
		if ok, err := r.Contains(ctx, "pkg"); !ok || err != nil {
			t.Fatalf("Contains after Store = %v, %v; want true", ok, err)
		}
		dst := t.TempDir()
		if ok, err := r.Fetch(ctx, "pkg", dst); !ok || err != nil {
			t.Fatalf("Fetch = %v, %v; want a hit", ok, err)
		}
		if got := digest(t, dst); got != rec.Digest {
			t.Errorf("fetched digest %s, want %s", got, rec.Digest)
		}
		for _, name := range []string{"rt/pkg.tar.zst", "rt/pkg.json"} {
			if _, err := sw.client.StatObject(ctx, "granary", name, minio.StatObjectOptions{}); err != nil {
				t.Errorf("object %s: %v", name, err)
			}
		}
	})

	t.Run("multipart", func(t *testing.T) {
		// 12 MiB of random data in 5 MiB parts: three parts, one in
		// memory at a time.
		r := sw.open(t, "granary", "mp", cache.WithPartSize(5<<20))
		src, rec := bigTree(t, 12)
		if err := r.Store(ctx, "big", src, rec); err != nil {
			t.Fatalf("Store: %v", err)
		}
		info, err := sw.client.StatObject(ctx, "granary", "mp/big.tar.zst", minio.StatObjectOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if !strings.HasSuffix(strings.Trim(info.ETag, `"`), "-3") {
			t.Errorf("archive ETag %q, want a multipart upload of 3 parts (-3)", info.ETag)
		}
		dst := t.TempDir()
		if ok, err := r.Fetch(ctx, "big", dst); !ok || err != nil {
			t.Fatalf("Fetch = %v, %v; want a hit", ok, err)
		}
		if got := digest(t, dst); got != rec.Digest {
			t.Errorf("fetched digest %s, want %s", got, rec.Digest)
		}
	})

	t.Run("wrong credentials", func(t *testing.T) {
		t.Setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
		r := sw.open(t, "granary", "rt", cache.WithRetries(0))
		src, rec := published(t)
		ok, err := r.Fetch(ctx, "pkg", t.TempDir())
		if ok || err == nil {
			t.Errorf("Fetch with a wrong secret = %v, %v; want an error, not a miss", ok, err)
		}
		t.Logf("Fetch with a wrong secret: %v", err)
		if err := r.Store(ctx, "pkg2", src, rec); err == nil {
			t.Error("Store with a wrong secret succeeded")
		}
		t.Setenv("AWS_ACCESS_KEY_ID", "nobody")
		if ok, err := sw.open(t, "granary", "rt").Fetch(ctx, "pkg", t.TempDir()); ok || err == nil {
			t.Errorf("Fetch with an unknown access key = %v, %v; want an error", ok, err)
		}
	})

	t.Run("missing bucket", func(t *testing.T) {
		r := sw.open(t, "no-such-bucket", "x", cache.WithRetries(0))
		src, rec := published(t)
		ok, err := r.Fetch(ctx, "pkg", t.TempDir())
		if ok || err == nil || !strings.Contains(err.Error(), `bucket "no-such-bucket" does not exist`) {
			t.Errorf("Fetch from a missing bucket = %v, %v; want an error naming the bucket, not a miss", ok, err)
		}
		if ok, err := r.Contains(ctx, "pkg"); ok || err == nil {
			t.Errorf("Contains in a missing bucket = %v, %v; want an error", ok, err)
		}
		// SeaweedFS creates buckets on upload for admin identities
		// (-s3.autoCreateBucket), so Store may succeed; either way a
		// later Fetch must see what it stored.
		if err := r.Store(ctx, "pkg", src, rec); err == nil {
			if ok, err := r.Fetch(ctx, "pkg", t.TempDir()); !ok || err != nil {
				t.Errorf("Fetch after Store into an auto-created bucket = %v, %v", ok, err)
			}
		} else {
			t.Logf("Store into a missing bucket: %v", err)
		}
	})

	t.Run("interrupted upload", func(t *testing.T) {
		r := sw.open(t, "granary", "cut", cache.WithPartSize(5<<20))
		src, rec := bigTree(t, 16)
		sctx, cancel := context.WithCancel(ctx)
		defer cancel()
		// Cut the upload once the server has a multipart upload under
		// way for the archive.
		go func() {
			defer cancel()
			for sctx.Err() == nil {
				for u := range sw.client.ListIncompleteUploads(sctx, "granary", "cut/", true) {
					if u.Err == nil && u.Key == "cut/big.tar.zst" {
						return
					}
				}
				time.Sleep(5 * time.Millisecond)
			}
		}()
		err := r.Store(sctx, "big", src, rec)
		if err == nil {
			t.Skip("the upload finished before it could be cut")
		}
		t.Logf("Store: %v", err)
		if ok, err := r.Fetch(ctx, "big", t.TempDir()); ok || err != nil {
			t.Errorf("Fetch after an interrupted upload = %v, %v; want a miss", ok, err)
		}
		for _, name := range []string{"cut/big.tar.zst", "cut/big.json"} {
			if _, err := sw.client.StatObject(ctx, "granary", name, minio.StatObjectOptions{}); minio.ToErrorResponse(err).Code != minio.NoSuchKey {
				t.Errorf("%s after an interrupted upload: %v; want NoSuchKey", name, err)
			}
		}
		// The client aborts before Store returns; the server's listing of
		// open uploads may lag behind the abort for a moment under load.
		n := -1
		for deadline := time.Now().Add(10 * time.Second); n != 0 && time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
			n = 0
			for u := range sw.client.ListIncompleteUploads(ctx, "granary", "cut/", true) {
				if u.Err == nil {
					n++
				}
			}
		}
		if n != 0 {
			t.Errorf("%d multipart uploads left open; the failed upload must be aborted", n)
		}
	})

	t.Run("signed", func(t *testing.T) {
		open := func(t *testing.T, opts ...cache.Option) *cache.Remote {
			return sw.open(t, "granary", "signed", opts...)
		}
		exerciseSigned(t, open, s3Objects{sw, "signed/"})
	})

	t.Run("signed through Build", func(t *testing.T) {
		open := func(t *testing.T, opts ...cache.Option) *cache.Remote { return sw.open(t, "granary", "build", opts...) }
		exerciseStoreSigned(t, open, s3Objects{sw, "build/"})
	})
}

func TestNewS3(t *testing.T) {
	t.Setenv("AWS_ENDPOINT_URL_S3", "")
	t.Setenv("AWS_ENDPOINT_URL", "")
	for _, tc := range []struct {
		url, want string // want: "" = ok, else a substring of the error
		desc      string
	}{
		{"s3://bucket/some/prefix/?endpoint=http://127.0.0.1:8333", "", "s3://bucket/some/prefix/ at http://127.0.0.1:8333"},
		{"s3://bucket", "", "s3://bucket/"},
		{"s3:///prefix", "want s3://bucket/prefix", ""},
		{"s3://bucket/x?endpoint=ftp://h", "S3 endpoint", ""},
		{"s3://bucket/x?endpoint=http://h/path", "S3 endpoint", ""},
		{"s3://bucket/x?acl=private", `unknown parameter "acl"`, ""},
		{"s3://key:secret@bucket/x", "want s3://bucket/prefix", ""},
	} {
		r, err := cache.Open(tc.url)
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("Open(%q) = %v", tc.url, err)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("Open(%q) = %v; want an error containing %q", tc.url, err, tc.want)
		case err == nil:
			if got := r.String(); got != tc.desc {
				t.Errorf("Open(%q).String() = %q, want %q", tc.url, got, tc.desc)
			}
			r.Close()
		}
		if strings.Contains(fmt.Sprint(err), "secret") {
			t.Errorf("error shows the secret: %v", err)
		}
	}
	t.Setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
	r, err := cache.Open("s3://bucket/p")
	if err != nil || r.String() != "s3://bucket/p/ at http://127.0.0.1:9" {
		t.Errorf("with $AWS_ENDPOINT_URL_S3: %v, %v", r, err)
	}
}
