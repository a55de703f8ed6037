<?php
// Loads the example's classes; no Composer needed for `php -S`.

declare(strict_types=1);

require_once __DIR__ . '/Http.php';
require_once __DIR__ . '/Tokens.php';
require_once __DIR__ . '/Store.php';
require_once __DIR__ . '/Gateway.php';
require_once __DIR__ . '/App.php';
