<?php
// RoadRunner worker: the same App as router.php, behind RoadRunner's PSR-7 worker.
//
//   composer install && rr serve      (config in .rr.yaml)
//
// Each worker process lives for many requests, so App (and its SQLite connection)
// is built once per process.

declare(strict_types=1);

ini_set('display_errors', 'stderr');

// This port serves the page to browsers too: without the gateways' token anyone could
// speak as a member (POST /<ClientId>) or remove one (DELETE). Checked before anything is
// loaded, so that the message is the first thing said.
if ((string) getenv('WS2HTTP_API_TOKEN') === '') {
    fwrite(STDERR, "worker.php: set WS2HTTP_API_TOKEN to the gateways' --api-token\n");
    exit(1);
}

require __DIR__ . '/vendor/autoload.php';
require __DIR__ . '/src/bootstrap.php';

use Nyholm\Psr7\Factory\Psr17Factory;
use Nyholm\Psr7\Response as PsrResponse;
use Spiral\RoadRunner\Http\PSR7Worker;
use Spiral\RoadRunner\Worker;
use Ws2httpExample\App;
use Ws2httpExample\Request;

$factory = new Psr17Factory();
$psr7 = new PSR7Worker(Worker::create(), $factory, $factory, $factory);
$app = App::fromEnv();

while (true) {
    try {
        $psrRequest = $psr7->waitRequest();
        if ($psrRequest === null) {
            break; // RoadRunner asked the worker to stop
        }
    } catch (\Throwable $e) {
        $psr7->respond(new PsrResponse(400, [], 'bad request'));
        continue;
    }

    try {
        $query = [];
        parse_str($psrRequest->getUri()->getQuery(), $query);
        $response = $app->handle(new Request(
            $psrRequest->getMethod(),
            $psrRequest->getUri()->getPath() ?: '/',
            $query,
            $psrRequest->getHeaders(),
            (string) $psrRequest->getBody(),
            $psrRequest->getCookieParams(),
        ));
        $psr7->respond(new PsrResponse($response->status, $response->headers, $response->body));
    } catch (\Throwable $e) {
        $psr7->respond(new PsrResponse(500, [], 'internal error'));
        $psr7->getWorker()->error((string) $e);
    }
}
